"""Every config field, documented once, with the embedded demo's values as defaults.

`configs/*.py` start from `get_config()` and override what differs (a task, a model,
paths, steps), so a field has one home and one meaning across configs. Any field can be
overridden on the command line: `--config.phases.stage2.steps=50`.
"""
import ml_collections

from score_jax import sharding


def sft_phase(init: str, steps: int, learning_rate: float, **kw) -> ml_collections.ConfigDict:
  """A supervised phase (recipes.py): next-token loss on episodes in the loss layout.

  data: 'transcripts' (the task's simulated student: how the embedded base is made),
  'star' (the init model's own traces, filtered: STaR), 'pair' (its wrong and right
  attempts paired: Pair-SFT). loss_turns: the attempts whose tokens get the loss ()=all).
  turns: attempts per episode (0 = the run's). Adam with warmup + cosine decay.
  """
  p = ml_collections.ConfigDict(dict(
      kind='sft', init=init, steps=steps, learning_rate=learning_rate, turns=0,
      data='transcripts', loss_turns=(), batch_size=64, warmup_steps=100, weight_decay=0.0,
      grad_clip=1.0))
  p.update(kw)
  return p


def rl_phase(init: str, reference: str, steps: int, learning_rate: float,
             train_turns: tuple, kl_coefs: tuple, alpha: float = 0.0,
             **kw) -> ml_collections.ConfigDict:
  """An RL phase (objective.py): on-policy episodes, per-turn returns and KL.

  train_turns: attempts that get a policy gradient (others are sampled and only held by
  their KL). kl_coefs / reward_weights: one entry per attempt, the last repeating
  ((0.01,) = 0.01 on all). alpha: the shaping bonus alpha * (r_t - r_{t-1}) on t >= 2.
  turns: attempts per episode (0 = the run's; 1 = single-turn RL).
  kl_target > 0 adapts the coefficients of the attempts that are not trained towards that
  KL per attempt (the ICLR version's adaptive beta2), by the factor
  1 + kl_adapt_rate * clip(KL / target - 1, -0.2, 0.2) per step.
  offline_turn1: the share of RLOO groups whose first attempt is sampled by the
  reference instead of the policy (no gradient on it; the later attempts train on it).
  select: 'last' hands the final params on; 'best_reward' the params at the best mean
  final-attempt training reward over `select_window` steps (the paper's selection rule).
  """
  p = ml_collections.ConfigDict(dict(
      kind='rl', init=init, reference=reference, steps=steps, learning_rate=learning_rate,
      turns=0, train_turns=tuple(train_turns), reward_weights=(1.0,), alpha=alpha,
      kl_coefs=tuple(kl_coefs), kl_target=0.0, kl_adapt_rate=0.1, offline_turn1=0.0,
      select='last', select_window=10))
  p.update(kw)
  return p


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train: the recipe's phases, evaluating each; eval: restore + evaluate.
  c.seed = 0
  # recipes.RECIPES: the ordered phases a run trains. turns: attempts per episode in
  # training and evaluation (0 = the recipe's: 2 for score, 3 for score3).
  c.recipe = "score"
  c.turns = 0

  # The task (score_jax/tasks/): name plus the task's own fields (paths, generator options).
  # slip_prob=0.9: the base rarely samples the right answer to a two-carry problem, so
  # RL has little to reinforce at turn 1 and learns it slowly, while turn 2 can read the
  # check (with 0.7, Stage II learned the slip away at turn 1; README "What the numbers say").
  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic", num_digits=2, num_operands=2, slip_prob=0.9, slip_min_carries=2,
      eval_fraction=0.125))
  # tasks/formats.py: 'plain' (newlines) or 'gemma_chat' (instruction-tuned Gemma's turn
  # markers; the model's <end_of_turn> also stops a turn).
  c.prompt_format = "plain"

  vocab = ml_collections.FieldReference(128)
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # '' = train on the task's text into <workdir>/tokenizer.model.
      vocab_size=vocab, corpus_size=4000))

  # ModelConfig fields (score_jax/model.py); `score_jax.presets.get(name)` gives Gemma's.
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

  # The weights the first phase starts from (a phase with init=''). source: 'random'
  # (seeded by `seed`); 'hf' = a Hugging Face safetensors directory, 'gemma' = an official
  # Flax/Orbax Gemma checkpoint, 'checkpoint' = our own Orbax directory, all at
  # `checkpoint`; imported weights are saved once as <workdir>/init/0.
  c.init = ml_collections.ConfigDict(dict(source="random", checkpoint=""))

  # Sampling during training (evaluation is greedy). Lengths in tokens; max_len is per
  # attempt. batch_size: episodes per sampler call (0 = the whole step at once), which
  # bounds the KV cache's memory. RL phases need temperature 1 and no top-k / top-p:
  # the loss differentiates the untransformed policy.
  c.rollout = ml_collections.ConfigDict(dict(
      max_prompt_len=16, max_len=32, temperature=1.0, top_k=0, top_p=1.0, batch_size=0))

  # Settings shared by every RL phase. Episodes per step = num_prompts * samples_per_prompt
  # (RLOO groups of k samples). kl_estimator: 'k1' = KL(pi || ref), 'k3' = KL(ref || pi);
  # kl_form: 'sequence' follows the gradient of each attempt's sequence KL (the objective
  # the betas weigh), 'token' the per-token surrogate (objective.kl_surrogate says how they
  # differ). microbatches: the loss step takes the batch in that many slices, summing
  # gradients; reference_dtype: the frozen reference's storage dtype (bfloat16 halves it).
  c.rl = ml_collections.ConfigDict(dict(
      num_prompts=16, samples_per_prompt=4, grad_clip=1.0,
      kl_estimator="k1", kl_form="sequence", baseline="rloo", normalize_advantages=False,
      logprob_chunk=64, microbatches=1, reference_dtype="float32"))

  # The phases recipes can use (recipes.RECIPES names the ordered list a run trains).
  # SCORE.md "Objectives": Stage I trains attempt 2 with attempt 1 held to the base by
  # beta2 = 0.1 (beta1 = 0.01 on attempt 2); Stage II trains both with the bonus alpha = 10
  # and beta1 on both.
  c.phases = ml_collections.ConfigDict()
  c.phases.base = sft_phase("", steps=800, learning_rate=3e-3)
  c.phases.stage1 = rl_phase("base", "base", 150, 5e-5, train_turns=(2,), kl_coefs=(0.1, 0.01))
  c.phases.stage2 = rl_phase("stage1", "base", 100, 2e-5, train_turns=(1, 2), kl_coefs=(0.01,),
                             alpha=10.0)
  # Three attempts (extended paper): 1(a) trains attempt 2 with attempt 1 anchored to the
  # base; 1(b) trains attempt 3 with attempts 1-2 anchored to the 1(a) model; 2 trains all
  # three with a bonus on each attempt's gain over the one before.
  c.phases.stage1a = rl_phase("base", "base", 150, 5e-5, train_turns=(2,), kl_coefs=(0.1, 0.01),
                              turns=2)
  c.phases.stage1b = rl_phase("stage1a", "stage1a", 100, 5e-5, train_turns=(3,),
                              kl_coefs=(0.1, 0.1, 0.01))
  c.phases.stage2_3turn = rl_phase("stage1b", "base", 100, 2e-5, train_turns=(1, 2, 3),
                                   kl_coefs=(0.01,), alpha=10.0)

  # Greedy evaluation on the task's held-out split after each phase.
  # repair_path: a JSONL of fixed first attempts for an offline repair evaluation
  # (MBPP-R) of code tasks; '' = none. checkpoint: evaluate one checkpoint directory.
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
  model is the base (a phase of 0 steps).
  """
  from score_jax import presets  # Here, so the demo does not import model presets.
  c = get_config()
  c.prompt_format = "gemma_chat"
  c.tokenizer.path = f"{weights_dir}/tokenizer.model"
  c.model = ml_collections.ConfigDict(presets.get(preset))
  c.model.update(dtype="bfloat16", param_dtype="float32", remat=True)
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=(sharding.DATA_AXIS,)))
  c.sharding_rules = [tuple(r) for r in sharding.FSDP_RULES]
  c.init.update(source="hf", checkpoint=weights_dir)
  c.phases.base.steps = 0
  c.rl.update(reference_dtype="bfloat16", logprob_chunk=256)
  c.checkpoint.update(every=100, keep=3)
  c.log_every = 1
  return c
