"""A run: the recipe's phases in order, each trained (or resumed, or skipped), evaluated and
reported.

How each phase starts, decided once here (big_vision style):
  1. a phase whose checkpoint directory holds its last step is finished: it is not
     trained again, and its params are restored only when something needs them;
  2. a phase with an earlier checkpoint resumes from it (train.py);
  3. otherwise it starts from the final params of its `init` phase, restored from that
     phase's checkpoint ('' = the run's initial weights: random, or imported once from
     `config.init` and saved as <workdir>/init/0). RL phases restore their `reference`
     the same way, in `rl.reference_dtype`.
A phase of 0 steps is its init's params under a new name. At any time a run holds one
policy, its optimizer state and one reference: a phase's params are freed when it has
been evaluated. A checkpoint made under other settings (recipes.fingerprints) is refused.
"""
from __future__ import annotations

import json
import os

import numpy as np

from score_jax import checkpoints
from score_jax import episodes as episodes_lib
from score_jax import evaluate
from score_jax import hosts
from score_jax import recipes
from score_jax import sft_data
from score_jax import train
from score_jax.model import ModelConfig
from score_jax.tasks import formats
from score_jax.tasks import get_task
from score_jax.tokenizer import Tokenizer, load_tokenizer

INIT_SOURCES = ("random", "checkpoint", "hf", "gguf", "gemma")


class Run:
  """The pieces of one run: config, setup (mesh, model), tokenizer, task, episodes, phases."""

  def __init__(self, config, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    self.phases = recipes.resolve(config)
    self.turns = recipes.run_turns(config)
    self.fingerprints = recipes.fingerprints(config, self.phases)
    self.task = get_task(config.task)
    if config.prompt_format == "chat_template":  # The model's own template decides the format.
      from score_jax import chat_template
      self.tok = load_tokenizer(config.tokenizer.path)
      self.fmt = chat_template.prompt_format(self.tok)
    else:
      self.fmt = formats.get_prompt_format(config.prompt_format)
      self.tok = load_or_train_tokenizer(self)
    if self.tok.vocab_size > config.model.vocab_size:
      raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                       f"tokenizer's {self.tok.vocab_size} pieces")
    self.setup = train.Setup(config, workdir)
    s = self.setup
    self.episodes = episodes_lib.Episodes(s.model, (s.param_sh, s.batch_sh, s.repl_sh), self.tok,
                                          self.task, self.fmt, config.rollout)
    self.by_name = {p.name: p for p in self.phases}
    if hosts.is_writer():
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

  def close(self):
    self.task.close()  # Verifier workers.

  # -- params of a phase ----------------------------------------------------------------

  def alias(self, name: str) -> str:
    """The phase whose params `name` has: itself, or its init's after 0 steps ('' = the
    initial weights)."""
    while name and self.by_name[name].steps == 0:
      name = self.by_name[name].cfg.init
    return name

  def params_of(self, name: str):
    """Final params of phase `name`, restored from its checkpoint (or the initial ones)."""
    name = self.alias(name)
    if not name:
      return initial_params(self)
    best = train.best_dir(self.workdir, name)
    if self.by_name[name].cfg.get("select") == "best_reward" and checkpoints.latest_step(best):
      return self.setup.restore_params(best)
    return self.setup.restore_params(os.path.join(self.workdir, name))

  def finished(self, phase) -> bool:
    return phase.steps == 0 or checkpoints.latest_step(
        os.path.join(self.workdir, phase.name)) == phase.steps

  # -- training -------------------------------------------------------------------------

  def check_fingerprint(self, phase):
    """Refuses a checkpoint made under other settings; records the one about to be made."""
    path = os.path.join(self.workdir, "phases.json")
    record = json.load(open(path)) if os.path.exists(path) else {}
    digest, inputs = self.fingerprints[phase.name]
    old = record.get(phase.name)
    has_checkpoint = checkpoints.latest_step(os.path.join(self.workdir, phase.name)) is not None
    if old and old["fingerprint"] != digest and has_checkpoint:
      changed = "; ".join(recipes.changed_fields(old["inputs"], inputs)) or "(unknown)"
      raise recipes.ConfigError(
          f"{self.workdir}/{phase.name} was trained under other settings ({changed}); use "
          "another --workdir, or delete that phase's directory to retrain it")
    record[phase.name] = dict(fingerprint=digest, inputs=inputs)
    evaluate.write_json(path, record)

  def train(self, phase):
    """Trains (or resumes) one phase; returns its params."""
    self.check_fingerprint(phase)
    init = lambda: self.params_of(phase.cfg.init)
    if phase.kind == "sft":
      rows = (sft_data.transcript_rows(self.task, phase, self.config.seed)
              if phase.cfg.data == "transcripts" else sft_data.self_generated_rows(
                  self.config, self.episodes, phase,
                  os.path.join(self.workdir, f"{phase.name}_data")))
      return train.sft_phase(self.setup, self.episodes, phase, init, rows)
    reference = self.setup.as_reference(self.params_of(phase.cfg.reference))
    return train.rl_phase(self.setup, self.episodes, phase, init, reference)

  def evaluate(self, name: str, params, results: dict, step=None) -> dict:
    """Greedy evaluation of `params` as phase `name`, or the result of the phase whose
    params they are (a 0-step phase) when that one is already evaluated."""
    same_as = self.alias(name)
    if same_as != name and same_as in results:
      return dict(results[same_as], phase=name, same_as=same_as)
    digest = self.fingerprints[name][0] if name in self.fingerprints else None
    path = os.path.join(self.workdir, "eval", f"{name}.json")
    if hosts.agree(os.path.exists(path)):  # Already evaluated with these params and settings.
      with open(path) as f:
        r = json.load(f)
      if (r.get("checkpoint_step") == step and r.get("fingerprint") == digest
          and r.get("n") == self.config.eval.num_problems):
        return r
    if params is None:
      params = self.params_of(name)
    return evaluate.evaluate_phase(self.episodes, name, params, self.config.eval, self.turns,
                                   os.path.join(self.workdir, "eval"), checkpoint_step=step,
                                   fingerprint=digest)


def load_or_train_tokenizer(run: Run) -> Tokenizer:
  """The tokenizer at `config.tokenizer.path` (a model's own), else one trained here on the
  task's text into the workdir (kept, so a resumed run reuses it)."""
  config, task, fmt = run.config, run.task, run.fmt
  if config.tokenizer.path:  # SentencePiece, tokenizer.json or a GGUF file's metadata.
    return load_tokenizer(config.tokenizer.path)
  path = os.path.join(run.workdir, "tokenizer.model")
  if hosts.is_writer() and not os.path.exists(path):  # The other processes read its file.
    rng = np.random.default_rng([config.seed, 99])
    n = config.tokenizer.corpus_size
    instruction = fmt.instruction_text(task)
    if any(p.kind == "sft" and p.cfg.data == "transcripts" and p.steps for p in run.phases):
      # An embedded base model: the transcripts it is trained on.
      texts = [fmt.prompt_text(task, p) + instruction.join(attempts)
               for p, attempts in task.base_transcripts(rng, n, run.turns)]
    else:  # A tiny model on a real task (tests, smoke runs): the task's own text.
      texts = [instruction] + [fmt.prompt_text(task, p) for p in task.train_problems(rng, n)]
      texts += list(task.corpus(rng, n))
    print(f"training the tokenizer on {len(texts)} texts -> {path}", flush=True)
    Tokenizer.train(texts, config.tokenizer.vocab_size, path,
                    user_defined_symbols=fmt.special_pieces)
  hosts.sync("tokenizer written")
  return Tokenizer.load(path)


def check_model_matches(model_cfg: ModelConfig, checkpoint_fields: dict, where: str):
  """Shapes catch a wrong width at import; a wrong window, soft-cap or rotary base would
  load fine and silently compute another network, so compare every field."""
  bad = {k: (getattr(model_cfg, k), v) for k, v in checkpoint_fields.items()
         if getattr(model_cfg, k) != v}
  if bad:
    fields = ", ".join(f"config.model.{k}={ours!r} but the checkpoint has {theirs!r}"
                       for k, (ours, theirs) in sorted(bad.items()))
    raise ValueError(f"{where}/config.json disagrees with the model config: {fields}")


def _import(run: Run):
  s, i = run.setup, run.config.init
  if i.source == "checkpoint":  # Our own Orbax checkpoint directory.
    return s.restore_params(i.checkpoint)
  if i.source == "hf":
    from score_jax.weights import hf
    if os.path.isdir(i.checkpoint):
      check_model_matches(s.model.config, hf.load_config(i.checkpoint), i.checkpoint)
    return hf.load_safetensors(i.checkpoint, s.model.config, shardings=s.param_sh,
                               abstract=s.abstract_params)
  if i.source == "gguf":  # A llama.cpp file, dequantized.
    from score_jax.weights import gguf
    check_model_matches(s.model.config, gguf.model_config_from_gguf(i.checkpoint), i.checkpoint)
    return gguf.load_gguf(i.checkpoint, s.model.config, shardings=s.param_sh,
                          abstract=s.abstract_params)
  if i.source == "gemma":
    from score_jax.weights import gemma
    # Released checkpoints pad the embedding to 256,128 rows; the tokenizer has 256,000.
    return gemma.load_checkpoint(i.checkpoint, s.model.config, shardings=s.param_sh,
                                 truncate_vocab=True, abstract=s.abstract_params)
  raise ValueError(f"config.init.source={i.source!r}: must be one of {INIT_SOURCES}")


def initial_params(run: Run):
  """The weights of a phase with init='': random (seeded), or imported once and kept as
  our own Orbax checkpoint <workdir>/init/0, so a resumed run and --config.mode=eval
  restore them from there instead of importing again."""
  i = run.config.init
  if i.source == "random":
    return run.setup.init_params(run.config.seed)
  directory = os.path.join(run.workdir, "init")
  if checkpoints.latest_step(directory) is not None:
    return run.setup.restore_params(directory)
  params = _import(run)
  ckpt = checkpoints.Checkpointer(directory)
  try:
    ckpt.save(0, params, meta=dict(phase="init", source=i.source, checkpoint=i.checkpoint),
              force=True)
  finally:
    ckpt.close()
  print(f"[init] {i.source} weights saved as {directory}/0", flush=True)
  return params


def train_and_evaluate(config, workdir: str, after=None) -> dict:
  """--config.mode=train: every phase of the recipe, evaluated after it; then the report.
  `after(run, results)`, if given, runs before the run's workers close (the experiment
  suite measures more there)."""
  run = Run(config, workdir)
  try:
    print("recipe " + config.recipe + ":\n" + recipes.describe(run.phases), flush=True)
    results = {}
    for phase in run.phases:
      params = None
      if not run.finished(phase):
        params = run.train(phase)
      elif phase.steps:
        run.check_fingerprint(phase)
      results[phase.name] = run.evaluate(phase.name, params, results, phase.steps or None)
      del params  # One policy at a time.
    evaluate.report(os.path.join(workdir, "eval"), results)
    if after is not None:
      after(run, results)
    return results
  finally:
    run.close()


def evaluate_checkpoints(config, workdir: str) -> dict:
  """--config.mode=eval: restore each phase's checkpoint (or `eval.checkpoint`) and
  evaluate it without training; phases not trained yet are skipped, saying so."""
  run = Run(config, workdir)
  try:
    results = {}
    if config.eval.checkpoint:
      directory = config.eval.checkpoint
      step = checkpoints.latest_step(directory)
      if step is None:
        raise FileNotFoundError(f"config.eval.checkpoint={directory!r}: no checkpoint there")
      name = os.path.basename(os.path.normpath(directory))
      results[name] = evaluate.evaluate_phase(
          run.episodes, name, run.setup.restore_params(directory, step), config.eval,
          run.turns, os.path.join(workdir, "eval"), checkpoint_step=step)
    for phase in ([] if config.eval.checkpoint else run.phases):
      step = checkpoints.latest_step(os.path.join(workdir, phase.name)) if phase.steps else None
      if phase.steps and step is None:
        print(f"[eval] {phase.name}: no checkpoint in {workdir}/{phase.name}, skipped", flush=True)
        continue
      params = None if run.alias(phase.name) in results else run.params_of(phase.name)
      results[phase.name] = evaluate.evaluate_phase(
          run.episodes, phase.name, params, config.eval, run.turns,
          os.path.join(workdir, "eval"), checkpoint_step=step,
          fingerprint=run.fingerprints[phase.name][0]) if params is not None else dict(
              results[run.alias(phase.name)], phase=phase.name, same_as=run.alias(phase.name))
      del params
    if not results:
      raise FileNotFoundError(f"no checkpoints to evaluate in {workdir} (recipe "
                              f"{config.recipe}: {[p.name for p in run.phases]}); train first "
                              "or set --config.eval.checkpoint")
    evaluate.report(os.path.join(workdir, "eval"), results)
    return results
  finally:
    run.close()
