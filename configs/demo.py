"""The embedded CPU demo: SCoRe end to end on a model it makes itself, in minutes.

    pip install -e . && python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

No download: the run generates addition problems with a written check (see
score_jax/tasks/arithmetic.py), trains a SentencePiece tokenizer and a small base model
whose second attempt is an independent retry (so it does not self-correct), then runs
SCoRe Stage I and Stage II and prints the self-correction table for base / Stage I /
Stage II (also runs/demo/eval/table.json and table.png). Any field can be overridden,
e.g. --config.stage2.steps=50 --config.eval.num_problems=200.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train: tokenizer -> base -> Stage I -> Stage II, eval of each; eval: restore + eval.
  c.seed = 0

  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic", num_digits=2, slip_prob=0.7, slip_min_carries=2, eval_fraction=0.125))

  vocab = ml_collections.FieldReference(128)
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # '' = train on the task's corpus into <workdir>/tokenizer.model.
      vocab_size=vocab, corpus_size=4000))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=vocab, embed_dim=128, hidden_dim=512, num_layers=4, num_heads=4,
      num_kv_heads=1, head_dim=32, rope_base=10_000, dtype="float32",
      param_dtype="float32", remat=False))

  # Mesh over all local devices, data-parallel; rules place params (regex -> spec).
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=("data",)))
  c.sharding_rules = [(".*", ())]

  # The base model. 'sft': make it here from the task's base transcripts (embedded demo).
  c.base = ml_collections.ConfigDict(dict(
      source="sft", checkpoint="", steps=800, batch_size=32, learning_rate=3e-3,
      warmup_steps=100, weight_decay=0.0))

  # Two-turn sampling during training (evaluation is greedy).
  c.rollout = ml_collections.ConfigDict(dict(
      max_prompt_len=16, max_len_1=32, max_len_2=32, temperature=1.0, top_k=0, top_p=1.0))

  # SCoRe: shared RL settings, then the two stages (SCORE.md "Objectives").
  c.rl = ml_collections.ConfigDict(dict(
      num_prompts=16, samples_per_prompt=4, grad_clip=1.0,
      kl_estimator="k1", baseline="rloo", normalize_advantages=False, logprob_chunk=64))
  c.stage1 = ml_collections.ConfigDict(dict(steps=150, learning_rate=5e-5, beta1=0.01, beta2=0.1))
  c.stage2 = ml_collections.ConfigDict(dict(steps=100, learning_rate=2e-5, beta1=0.01, alpha=10.0))

  c.eval = ml_collections.ConfigDict(dict(
      num_problems=1000, batch_size=250, num_transcripts=50, checkpoint=""))

  c.checkpoint = ml_collections.ConfigDict(dict(every=25, keep=2))
  c.log_every = 10  # Console; every step goes to JSONL and TensorBoard.
  return c
