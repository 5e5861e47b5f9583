"""Every config field, documented once, with the embedded demo's values as defaults.

`configs/*.py` start from `get_config()` and override what differs (a task, a model,
paths, steps), so a field has one home and one meaning across configs. Any field can be
overridden on the command line: `--config.stage2.steps=50`.
"""
import ml_collections

from score_jax import sharding


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train: base -> Stage I -> Stage II, eval of each; eval: restore + eval.
  c.seed = 0

  # The task (score_jax/tasks/): name plus the task's own fields (paths, generator options).
  # slip_prob=0.9: the base rarely samples the right answer to a two-carry problem, so
  # RL has little to reinforce at turn 1 and learns it slowly, while turn 2 can read the
  # check (with 0.7, Stage II learned the slip away at turn 1; README "What the numbers say").
  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic", num_digits=2, num_operands=2, slip_prob=0.9, slip_min_carries=2,
      eval_fraction=0.125))
  # 'plain' (newlines), 'gemma_chat' (instruction-tuned Gemma's turn markers; the
  # model's <end_of_turn> also stops a turn) or 'chat_template' (the tokenizer's own chat
  # template, score_jax/chat_template.py; its end-of-turn token stops a turn).
  c.prompt_format = "plain"

  vocab = ml_collections.FieldReference(128)
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # '' = train on the task's text into <workdir>/tokenizer.model.
      vocab_size=vocab, corpus_size=4000))

  # ModelConfig fields (score_jax/model.py); `score_jax.presets.get(name)` gives published
  # sizes (Gemma, Llama 3, Qwen2.5/3, SmolLM2).
  # Precision: param_dtype float32 + dtype bfloat16 is mixed precision, the params being
  # the float32 master (cast to bfloat16 where used); param_dtype bfloat16 stores bfloat16
  # params and keeps the float32 master inside the optimizer (train.with_float32_master).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=vocab, embed_dim=128, hidden_dim=512, num_layers=4, num_heads=4,
      num_kv_heads=1, head_dim=32, rope_base=10_000, dtype="float32",
      param_dtype="float32", remat=False))

  # Mesh over all local devices, data-parallel; rules place params (regex -> spec).
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=("data",)))
  c.sharding_rules = [(".*", ())]

  # The base model, which is also the frozen reference. source: 'sft' = make it here from
  # the task's base transcripts (embedded tasks); 'hf' = a Hugging Face safetensors
  # directory, 'gguf' = a llama.cpp .gguf file (dequantized), 'gemma' = an official
  # Flax/Orbax Gemma checkpoint, 'checkpoint' = our own
  # Orbax directory (all at `checkpoint`); 'init' = random weights (smoke tests).
  c.base = ml_collections.ConfigDict(dict(
      source="sft", checkpoint="", steps=800, batch_size=64, learning_rate=3e-3,
      warmup_steps=100, weight_decay=0.0))

  # Two-turn sampling during training (evaluation is greedy). Lengths in tokens;
  # batch_size: episodes per sampler call (0 = the whole step at once), which bounds the
  # KV cache's memory.
  c.rollout = ml_collections.ConfigDict(dict(
      max_prompt_len=16, max_len_1=32, max_len_2=32, temperature=1.0, top_k=0, top_p=1.0,
      batch_size=0))

  # SCoRe: shared RL settings, then the two stages (SCORE.md "Objectives").
  # Episodes per step = num_prompts * samples_per_prompt (RLOO groups of k samples).
  # microbatches: the loss step takes the batch in that many slices, summing gradients
  # (activation memory of one slice); reference_dtype: the frozen reference's storage
  # dtype (bfloat16 halves its memory).
  c.rl = ml_collections.ConfigDict(dict(
      num_prompts=16, samples_per_prompt=4, grad_clip=1.0,
      kl_estimator="k1", baseline="rloo", normalize_advantages=False, logprob_chunk=64,
      microbatches=1, reference_dtype="float32"))
  c.stage1 = ml_collections.ConfigDict(dict(steps=150, learning_rate=5e-5, beta1=0.01, beta2=0.1))
  c.stage2 = ml_collections.ConfigDict(dict(steps=100, learning_rate=2e-5, beta1=0.01, alpha=10.0))

  # Greedy two-turn evaluation on the task's held-out split after each phase.
  # repair_path: a JSONL of fixed first attempts for an offline repair evaluation
  # (MBPP-R) of code tasks; '' = none.
  c.eval = ml_collections.ConfigDict(dict(
      num_problems=1000, batch_size=250, num_transcripts=50, checkpoint="", repair_path=""))

  c.checkpoint = ml_collections.ConfigDict(dict(every=25, keep=2))
  c.log_every = 10  # Console; every step goes to JSONL and TensorBoard.
  return c


def gemma_config(preset: str, weights_dir: str) -> ml_collections.ConfigDict:
  """Defaults for training a pretrained Gemma from `weights_dir` (Hugging Face layout:
  safetensors + config.json + tokenizer.model) on a real task.

  Instruction-tuned chat format; parameters, optimizer state and the reference sharded
  FSDP-style over all devices; bfloat16 activations on a float32 master copy, per-layer
  rematerialisation; the reference stored in bfloat16. No base training: the pretrained
  model is the base.
  """
  from score_jax import presets  # Here, so the demo does not import model presets.
  c = get_config()
  c.prompt_format = "gemma_chat"
  c.tokenizer.path = f"{weights_dir}/tokenizer.model"
  c.model = ml_collections.ConfigDict(presets.get(preset))
  c.model.update(dtype="bfloat16", param_dtype="float32", remat=True)
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=(sharding.DATA_AXIS,)))
  c.sharding_rules = [tuple(r) for r in sharding.FSDP_RULES]
  c.base.update(source="hf", checkpoint=weights_dir, steps=0)
  c.rl.update(reference_dtype="bfloat16", logprob_chunk=256)
  c.checkpoint.update(every=100, keep=3)
  c.log_every = 1
  return c
