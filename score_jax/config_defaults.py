"""Every config field, documented once, with the embedded demo's values as defaults.

`configs/*.py` start from `get_config()` and override what differs (a task, a model,
paths, steps), so a field has one home and one meaning across configs. Any field can be
overridden on the command line: `--config.phases.stage2.steps=50`.
"""
import ml_collections

from score_jax import sharding


def sft_phase(init: str, steps: int, learning_rate: float = 3e-3, **kw) -> ml_collections.ConfigDict:
  """A supervised phase (recipes.py): next-token loss on episodes in the loss layout.

  data: 'transcripts' (the task's simulated student: how the embedded base is made);
  'star' (the model's own episodes that turned a wrong first attempt into a right one),
  'star_right' (its episodes whose last attempt is right and not worse than the first),
  'pair' (its wrong and right first attempts at one problem, paired): self-generated, at
  the rollout temperature, `samples` episodes in all, drawn afresh from the current params
  at the start of each of `rounds` equal parts of the phase (saved in <workdir>/<name>_data/).
  loss_turns: the attempts whose tokens get the loss (() = all; 'star_right' trains its
  right attempts). turns: attempts per episode (0 = the run's). Adam, warmup + cosine.
  """
  p = ml_collections.ConfigDict(dict(
      kind='sft', init=init, steps=steps, learning_rate=learning_rate, turns=0,
      data='transcripts', loss_turns=(), batch_size=64, warmup_steps=100, weight_decay=0.0,
      grad_clip=1.0, samples=0, rounds=1))
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
  # tasks/formats.py: 'plain' (newlines), 'gemma_chat' (instruction-tuned Gemma's turn
  # markers; the model's <end_of_turn> also stops a turn) or 'chat_template' (the
  # tokenizer's own chat template, score_jax/chat_template.py; its end-of-turn token stops
  # a turn).
  c.prompt_format = "plain"

  vocab = ml_collections.FieldReference(128)
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # '' = train on the task's text into <workdir>/tokenizer.model.
      vocab_size=vocab, corpus_size=4000))

  # ModelConfig fields (score_jax/model.py); `score_jax.presets.get(name)` gives published
  # sizes (Gemma, Llama 3, Qwen2.5/3, SmolLM2).
  # Precision: param_dtype float32 + dtype bfloat16 is mixed precision, the params being
  # the float32 master (cast to bfloat16 where used); param_dtype bfloat16 stores bfloat16
  # params and keeps the float32 master inside the optimizer (optimizer.with_float32_master).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=vocab, embed_dim=128, hidden_dim=512, num_layers=4, num_heads=4,
      num_kv_heads=1, head_dim=32, rope_base=10_000, dtype="float32",
      param_dtype="float32", remat=False))

  # Mesh over all local devices, data-parallel; rules place params (regex -> spec).
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=("data",)))
  c.sharding_rules = [(".*", ())]

  # The weights the first phase starts from (a phase with init=''). source: 'random'
  # (seeded by `seed`); 'hf' = a Hugging Face safetensors directory, 'gguf' = a llama.cpp
  # .gguf file (dequantized), 'gemma' = an official Flax/Orbax Gemma checkpoint,
  # 'checkpoint' = our own Orbax directory, all at `checkpoint`; imported weights are saved
  # once as <workdir>/init/0.
  c.init = ml_collections.ConfigDict(dict(source="random", checkpoint=""))

  # Sampling during training (evaluation is greedy). Lengths in tokens; max_len is per
  # attempt. batch_size: episodes per sampler call (0 = the whole step at once); the
  # verifier scores each call's episodes while the device samples the next call's. slots:
  # KV-cache rows per call (0 = one per episode); fewer rows than episodes make the call a
  # queue (sampling.generate_queue) in which a row whose episode ended takes the next one,
  # instead of idling until the longest attempt of its batch ends: worth it when attempt
  # lengths spread widely, and it bounds the cache's memory. live_spans: a decode step
  # attends over the smallest of this many spans of the cache that holds every slot written
  # (sampling.live_spans), each span compiled once; 1 = the whole cache every step. Worth
  # it at long caches, where reading the empty future dominates a step. RL phases need
  # temperature 1 and no top-k / top-p: the loss differentiates the untransformed policy.
  c.rollout = ml_collections.ConfigDict(dict(
      max_prompt_len=16, max_len=32, temperature=1.0, top_k=0, top_p=1.0, batch_size=0,
      slots=0, live_spans=1))

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

  # The paper's comparison (recipes.RECIPES; README "The paper's comparison"). Budgets are
  # tied to SCoRe's by reference, so overriding Stage I / II moves them too: every RL method
  # trains as many steps (and episodes) as Stage I + Stage II, at Stage II's learning rate;
  # the SFT methods sample as many episodes as SCoRe's RL does and fine-tune for as many
  # steps. The SFT learning rate (1e-4, 10 warmup steps) was fixed before any comparison.
  s1, s2 = c.phases.stage1, c.phases.stage2
  rl_steps, rl_lr = s1.get_ref("steps") + s2.get_ref("steps"), s2.get_ref("learning_rate")
  episodes = rl_steps * c.rl.get_ref("num_prompts") * c.rl.get_ref("samples_per_prompt")
  c.phases.single_turn_rl = rl_phase("base", "base", rl_steps, rl_lr, train_turns=(1,),
                                     kl_coefs=(0.01,), turns=1)
  c.phases.multi_turn_rl = rl_phase("base", "base", rl_steps, rl_lr, train_turns=(1, 2),
                                    kl_coefs=(0.01,))
  c.phases.stage2_no_stage1 = rl_phase("base", "base", rl_steps, rl_lr, train_turns=(1, 2),
                                       kl_coefs=(0.01,), alpha=s2.get_ref("alpha"))
  c.phases.stage2_no_shaping = rl_phase("stage1", "base", s2.get_ref("steps"), rl_lr,
                                        train_turns=(1, 2), kl_coefs=(0.01,))
  c.phases.stage2_offline = rl_phase("stage1", "base", s2.get_ref("steps"), rl_lr,
                                     train_turns=(1, 2), kl_coefs=(0.01,),
                                     alpha=s2.get_ref("alpha"), offline_turn1=0.5)
  sft = dict(learning_rate=1e-4, warmup_steps=10, samples=episodes, rounds=2)
  # STaR: the base's own episodes that turned a wrong first attempt into a right one;
  # the loss on the second attempt. Pair-SFT: the base's wrong and right first attempts at
  # one problem as [problem, wrong, instruction, right]; the loss on the right one.
  c.phases.star = sft_phase("base", rl_steps, data="star", loss_turns=(2,), **sft)
  c.phases.pair_sft = sft_phase("base", rl_steps, data="pair", loss_turns=(2,), **sft)
  # STaR in place of REINFORCE in Stage II: the Stage I model's episodes whose last attempt
  # is right and not worse than the first, the loss on every right attempt.
  c.phases.stage2_star = sft_phase("stage1", s2.get_ref("steps"), data="star_right",
                                   **dict(sft, samples=s2.get_ref("steps") * c.rl.get_ref(
                                       "num_prompts") * c.rl.get_ref("samples_per_prompt")))

  # Greedy evaluation on the task's held-out split after each phase.
  # repair_path: a JSONL of fixed first attempts for an offline repair evaluation
  # (MBPP-R) of code tasks; '' = none. checkpoint: evaluate one checkpoint directory.
  c.eval = ml_collections.ConfigDict(dict(
      num_problems=1000, batch_size=250, num_transcripts=50, checkpoint="", repair_path=""))

  c.checkpoint = ml_collections.ConfigDict(dict(every=25, keep=2))
  c.log_every = 10  # Console; every step goes to JSONL and TensorBoard.
  return c


def _one_of(config, field: str, allowed):
  from score_jax.recipes import check
  value = config
  for part in field.split("."):
    value = value[part]
  check(value in allowed, field, value, f"must be one of {tuple(allowed)}")


def check(config, num_devices: int):
  """Fails early with a ConfigError naming the field, instead of deep inside a compiled
  function: allowed values, sizes that must divide, paths that must exist, the recipe."""
  import os
  from score_jax import recipes, run, sharding  # Here: configs import this module.
  from score_jax.recipes import check
  from score_jax.tasks import formats, known_tasks
  _one_of(config, "mode", ("train", "eval"))
  phases = recipes.resolve(config)
  _one_of(config, "init.source", run.INIT_SOURCES)
  _one_of(config, "prompt_format", tuple(formats.PROMPT_FORMATS) + ("chat_template",))
  _one_of(config, "task.name", tuple(known_tasks()))
  _one_of(config, "rl.reference_dtype", ("float32", "bfloat16"))
  _one_of(config, "model.param_dtype", ("float32", "bfloat16"))
  _one_of(config, "model.dtype", ("float32", "bfloat16"))
  m = config.model
  for f in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads", "num_kv_heads",
            "head_dim"):
    check(isinstance(m[f], int) and m[f] > 0, f"model.{f}", m[f], "must be a positive integer")
  check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
        f"must divide model.num_heads={m.num_heads}")
  r = config.rollout
  check(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0 (0 = greedy)")
  check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
  check(r.top_k >= 0, "rollout.top_k", r.top_k, "must be >= 0 (0 = off)")
  for f in ("max_prompt_len", "max_len", "live_spans"):
    check(isinstance(r[f], int) and r[f] > 0, f"rollout.{f}", r[f],
          "must be a positive integer")
  rl_phases = [p.name for p in phases if p.kind == "rl" and p.steps]
  if config.mode == "train" and rl_phases:
    # The loss differentiates log pi itself; samples from a tempered or truncated pi would
    # make the policy gradient biased and the KL the wrong one.
    for f, v, plain in (("temperature", r.temperature, 1.0), ("top_k", r.top_k, 0),
                        ("top_p", r.top_p, 1.0)):
      check(v == plain, f"rollout.{f}", v, f"RL phases {rl_phases} sample from the policy "
            f"itself: training needs {f}={plain} (evaluation is greedy regardless)")
  rl = config.rl
  if rl.baseline == "rloo":
    check(rl.samples_per_prompt >= 2, "rl.samples_per_prompt", rl.samples_per_prompt,
          "RLOO needs at least 2 samples per prompt (or set --config.rl.baseline=batch_mean)")
  data_size = num_devices
  if list(config.mesh.shape) != [-1]:
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    data_size = sharding.data_axis_size(mesh)
  # Several processes (hosts.py): each owns an equal share of the data axis and samples
  # whole RLOO groups, its share of the offline ones too.
  import jax
  procs = jax.process_count()
  check(data_size % procs == 0, "mesh.shape", tuple(config.mesh.shape),
        f"its data axis ({data_size} devices) must split evenly over the {procs} processes")
  check(rl.num_prompts % procs == 0, "rl.num_prompts", rl.num_prompts,
        f"must be a multiple of the {procs} processes (each samples whole RLOO groups)")
  for p in phases:
    offline = round(p.cfg.get("offline_turn1", 0) * rl.num_prompts) if p.kind == "rl" else 0
    check(offline % procs == 0, f"phases.{p.name}.offline_turn1", p.cfg.get("offline_turn1"),
          f"gives {offline} offline groups, not a multiple of the {procs} processes")
  episodes = rl.num_prompts * rl.samples_per_prompt
  check(isinstance(rl.microbatches, int) and rl.microbatches > 0
        and episodes % (rl.microbatches * data_size) == 0, "rl.microbatches", rl.microbatches,
        f"must divide the {episodes} episodes per step into slices that are multiples of "
        f"the data axis size ({data_size})")
  check(r.batch_size >= 0 and (r.batch_size == 0 or (
      episodes % r.batch_size == 0 and r.batch_size % data_size == 0)), "rollout.batch_size",
      r.batch_size, f"must be 0 or divide the {episodes} episodes per step, in multiples of "
      f"the data axis size ({data_size})")
  check(r.slots >= 0 and r.slots % data_size == 0, "rollout.slots", r.slots,
        f"must be 0 (one cache row per episode) or a multiple of the data axis size "
        f"({data_size})")
  sizes = [("rl.num_prompts * rl.samples_per_prompt", episodes),
           ("eval.batch_size", config.eval.batch_size)]
  sizes += [(f"phases.{p.name}.batch_size", p.cfg.batch_size) for p in phases if p.kind == "sft"]
  for f, v in sizes:
    check(v > 0 and v % data_size == 0, f, v,
          f"must be a positive multiple of the data axis size ({data_size} devices)")
  check(config.eval.num_problems > 0, "eval.num_problems", config.eval.num_problems, "must be > 0")
  uses_checkpoint = config.init.source != "random"
  for f, path in (("tokenizer.path", config.tokenizer.path),
                  ("eval.checkpoint", config.eval.checkpoint),
                  ("eval.repair_path", config.eval.repair_path),
                  ("init.checkpoint", config.init.checkpoint if uses_checkpoint else "")):
    check(not path or os.path.exists(path), f, path, "no such file or directory")
  if uses_checkpoint:
    check(bool(config.init.checkpoint), "init.checkpoint", config.init.checkpoint,
          f"required when init.source={config.init.source!r}")
    check(bool(config.tokenizer.path), "tokenizer.path", config.tokenizer.path,
          f"required with pretrained weights (init.source={config.init.source!r}): the "
          "model's own tokenizer.model, tokenizer.json directory or .gguf file")
  check(config.prompt_format != "chat_template" or bool(config.tokenizer.path),
        "tokenizer.path", config.tokenizer.path,
        "prompt_format='chat_template' reads the template from the model's tokenizer")


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
