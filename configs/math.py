"""SCoRe on MATH with Gemma-2 2B (instruction-tuned), the paper's hyperparameters and prompts.

    python -m score_jax.main --config=configs/math.py --workdir=runs/math

Put these on the machine first (nothing is downloaded; README "Real models and tasks"):
  weights/gemma-2-2b-it/   Hugging Face safetensors + config.json + tokenizer.model
  data/MATH/               the MATH release (train/<subject>/<id>.json, test/...)
  data/math500.jsonl       MATH500 (problem, answer, ...), the held-out evaluation split
and point elsewhere with --config.init.checkpoint=... --config.task.train_path=... etc.

Sized for one TPU v4-8 host (4 chips x 32 GiB) or v5e-8 (8 chips x 16 GiB), with the
paper's batch of 512 episodes (128 prompts x 4 samples for RLOO): the loss step takes it
in 32 microbatches and the sampler 64 episodes at a time; see
`config_defaults.gemma_config` for the layout. Estimated peak per device (remat on):
10.5 GiB on v5e-8, 21.1 GiB on v4-8 (--mesh=data:4 --hbm_gb=32), from
  python -m score_jax.memory --model=gemma2_2b --batch=512 --seq_len=2176 --prompt_len=512 \
      --mesh=data:8 --microbatches=32 --sample_batch=64 --dtype=bfloat16 --remat=true \
      --hbm_gb=16
"""
import ml_collections

from score_jax import config_defaults


def get_config():
  c = config_defaults.gemma_config("gemma2_2b", "weights/gemma-2-2b-it")
  c.task = ml_collections.ConfigDict(dict(
      name="math", train_path="data/MATH", eval_path="data/math500.jsonl"))
  c.rollout.update(max_prompt_len=512, max_len=768, temperature=1.0)
  # SCORE.md "Hyperparameters reported" (MATH): Adam, lr 5e-6, alpha 10, beta1 0.01,
  # beta2 0.1, training temperature 1.0; 3000 steps in all (split here 1000 / 2000).
  c.rl.update(num_prompts=128, samples_per_prompt=4, microbatches=32)
  c.rollout.batch_size = 64
  # A cache of 512 + 2 x 768 slots and more: each decode step reads only its live part
  # (sampling.live_spans; 1.49x new tok/s at 8 spans in bench/bench_spans.py on a CPU).
  c.rollout.live_spans = 8
  c.phases.stage1.update(steps=1000, learning_rate=5e-6, kl_coefs=(0.1, 0.01))  # beta2, beta1
  c.phases.stage2.update(steps=2000, learning_rate=5e-6, kl_coefs=(0.01,), alpha=10.0)
  c.eval.update(num_problems=500, batch_size=64, num_transcripts=100)
  return c
