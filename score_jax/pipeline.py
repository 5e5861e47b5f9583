"""The whole run: tokenizer -> base model -> SCoRe Stage I -> Stage II, evaluating each.

How a run starts, phase by phase (big_vision style, decided once here):
  1. a phase whose checkpoint directory in the workdir is complete is skipped and its
     final params restored;
  2. a phase with a partial checkpoint resumes from its latest step;
  3. otherwise the phase starts: the base from `config.base.source` (trained here for
     the embedded task; imported from Hugging Face safetensors or an official Gemma
     checkpoint, restored from our own Orbax checkpoint, or random for smoke tests, all
     then saved as `<workdir>/base/0`), Stage I from the base,
     Stage II from Stage I's final params. The frozen reference is always the base.
"""
import functools
import json
import os

import jax
import numpy as np

from score_jax import checkpoints
from score_jax import data
from score_jax.tasks import formats
from score_jax import evaluate
from score_jax import sampling
from score_jax.model import ModelConfig
from score_jax.tasks import get_task
from score_jax.tokenizer import Tokenizer, load_tokenizer
from score_jax.train import PHASES, Trainer


def load_or_train_tokenizer(config, workdir: str, task, fmt: formats.PromptFormat) -> Tokenizer:
  """The tokenizer at `config.tokenizer.path` (Gemma's tokenizer.model), else one trained
  here on the task's text into the workdir (kept, so a resumed run reuses it)."""
  if config.tokenizer.path:  # SentencePiece, tokenizer.json or a GGUF file's metadata
    return load_tokenizer(config.tokenizer.path)
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return Tokenizer.load(path)
  rng = np.random.default_rng([config.seed, 99])
  n = config.tokenizer.corpus_size
  if config.base.source == "sft":
    texts = [data.transcript_text(fmt, task, p, y1, y2)
             for p, y1, y2 in task.base_transcripts(rng, n)]
  else:  # A tiny model on a real task (tests, smoke runs): the task's own text.
    instruction = fmt.instruction_text(task)
    texts = [instruction] + [fmt.prompt_text(task, p) for p in task.train_problems(rng, n)]
    texts += list(task.corpus(rng, n))
  print(f"training the tokenizer on {len(texts)} texts -> {path}", flush=True)
  return Tokenizer.train(texts, config.tokenizer.vocab_size, path,
                         user_defined_symbols=fmt.special_pieces)


def build(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  task = get_task(config.task)
  if config.prompt_format == "chat_template":  # The model's own template decides the format.
    from score_jax import chat_template
    tok = load_tokenizer(config.tokenizer.path)
    fmt = chat_template.prompt_format(tok)
  else:
    fmt = formats.get_prompt_format(config.prompt_format)
    tok = load_or_train_tokenizer(config, workdir, task, fmt)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tok.vocab_size} pieces")
  return Trainer(config, workdir, tok, task, fmt)


def _import_base(trainer: Trainer):
  b = trainer.config.base
  if b.source == "init":  # Random weights: smoke tests of real-task plumbing only.
    return trainer.init_params(trainer.config.seed)
  if b.source == "checkpoint":  # Our own Orbax checkpoint directory.
    return trainer.restore_params(b.checkpoint)
  if b.source == "hf":
    from score_jax.weights import hf as import_hf
    if os.path.isdir(b.checkpoint):
      check_model_matches(trainer.model.config, import_hf.load_config(b.checkpoint),
                          b.checkpoint)
    return import_hf.load_safetensors(b.checkpoint, trainer.model.config,
                                      shardings=trainer.param_sh,
                                      abstract=trainer.abstract_params)
  if b.source == "gguf":  # A llama.cpp file, dequantized.
    from score_jax.weights import gguf as import_gguf
    check_model_matches(trainer.model.config, import_gguf.model_config_from_gguf(b.checkpoint),
                        b.checkpoint)
    return import_gguf.load_gguf(b.checkpoint, trainer.model.config, shardings=trainer.param_sh,
                                 abstract=trainer.abstract_params)
  if b.source == "gemma":
    from score_jax.weights import gemma as import_gemma
    # Released checkpoints pad the embedding to 256,128 rows; the tokenizer has 256,000.
    return import_gemma.load_checkpoint(b.checkpoint, trainer.model.config,
                                        shardings=trainer.param_sh, truncate_vocab=True,
                                        abstract=trainer.abstract_params)
  raise ValueError(f"config.base.source={b.source!r}: unknown")


def check_model_matches(model_cfg: ModelConfig, checkpoint_fields: dict, where: str):
  """Shapes catch a wrong width at import; a wrong window, soft-cap or rotary base would
  load fine and silently compute another network, so compare every field."""
  bad = {k: (getattr(model_cfg, k), v) for k, v in checkpoint_fields.items()
         if getattr(model_cfg, k) != v}
  if bad:
    fields = ", ".join(f"config.model.{k}={ours!r} but the checkpoint has {theirs!r}"
                       for k, (ours, theirs) in sorted(bad.items()))
    raise ValueError(f"{where}/config.json disagrees with the model config: {fields}")


def load_base(trainer: Trainer):
  """(base params, step) from `config.base.source`; see the module docstring.

  A base that is not trained here is written once as our own Orbax checkpoint
  `<workdir>/base/0`, so a resumed run and `--config.mode=eval` restore it from there
  instead of importing again.
  """
  b = trainer.config.base
  if b.source == "sft":
    return trainer.train_base(), b.steps
  directory = os.path.join(trainer.workdir, "base")
  if checkpoints.latest_step(directory) is not None:
    return trainer.restore_params(directory), 0
  params = _import_base(trainer)
  ckpt = checkpoints.Checkpointer(directory)
  try:
    ckpt.save(0, params, meta=dict(phase="base", source=b.source, checkpoint=b.checkpoint),
              force=True)
  finally:
    ckpt.close()
  print(f"[base] {b.source} weights saved as {directory}/0", flush=True)
  return params, 0


def evaluate_phase(trainer: Trainer, name: str, params, step=None) -> dict:
  """Greedy two-turn evaluation on held-out problems; writes eval/<name>.json + transcripts."""
  cfg = trainer.config.eval
  out_dir = os.path.join(trainer.workdir, "eval")
  problems = trainer.task.eval_problems(cfg.num_problems)
  result = evaluate.evaluate_policy(
      lambda batch, rng: trainer.rollout_and_score(params, batch, sampling.SampleParams.create(0.0), rng),
      problems, cfg.batch_size, os.path.join(out_dir, f"transcripts_{name}.jsonl"),
      cfg.num_transcripts)
  if cfg.repair_path:
    result.update(evaluate_repair(trainer, name, params, cfg.repair_path))
  result.update(phase=name, checkpoint_step=step)
  evaluate.write_json(os.path.join(out_dir, f"{name}.json"), result)
  print(f"[eval {name}]\n{evaluate.format_table({name: result})}", flush=True)
  return result


@functools.lru_cache(maxsize=None)
def _repair_set(task, path: str):
  """(MBPP-R episodes, accuracy of their given first attempts), built and sandboxed once
  per run rather than at every phase's evaluation."""
  from score_jax.tasks import code  # Code tasks only.
  mbpp = getattr(task, "mbpp", task)
  if not isinstance(mbpp, code.MBPPTask):
    raise ValueError(f"config.eval.repair_path needs an MBPP-based code task (mbpp, or "
                     f"humaneval with train_path); the task is {task.name!r}")
  repair = code.MBPPRepair(mbpp, path)
  return repair, float(repair.first_attempt_rewards().mean())


def evaluate_repair(trainer: Trainer, name: str, params, path: str) -> dict:
  """MBPP-R (SCORE.md): the model corrects given first attempts, greedily; only the
  correction is scored. The context is built exactly like a live turn 2."""
  task, tok, fmt = trainer.task, trainer.tok, trainer.fmt
  repair, given_acc = _repair_set(task, path)
  turn_end = trainer.stop_ids[-1]  # What ends a sampled y1: EOS, or <end_of_turn> in chat.
  bos = [] if tok.bos_id is None else [tok.bos_id]
  contexts = [bos + tok.encode(fmt.prompt_text(task, e.problem)) +
              tok.encode(e.first_attempt) + [turn_end] + trainer.instr.tolist()
              for e in repair.episodes]
  texts = []
  for start, batch, n in evaluate.padded_batches(contexts, trainer.config.eval.batch_size):
    y2 = trainer.second_turns(params, batch, sampling.SampleParams.create(0.0),
                              jax.random.key(start))
    texts += [tok.decode(t) for t in data.response_tokens(y2)[:n]]
  rewards = repair.score(texts)
  evaluate.write_jsonl(
      os.path.join(trainer.workdir, "eval", f"transcripts_repair_{name}.jsonl"),
      (dict(id=e.problem.id, first_attempt=e.first_attempt, y2=t, r2=r)
       for e, t, r in zip(repair.episodes, texts, rewards)))
  return dict(repair_acc=float(rewards.mean()), repair_n=len(rewards),
              repair_given_acc=given_acc)


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = build(config, workdir)
  try:
    return _train_and_evaluate(trainer)
  finally:
    trainer.task.close()  # Verifier workers.


def _train_and_evaluate(trainer: Trainer) -> dict:
  config, workdir = trainer.config, trainer.workdir
  results = {}

  def done(name, params, steps):
    path = os.path.join(workdir, "eval", f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        r = json.load(f)
      if r.get("checkpoint_step") == steps and r.get("n") == config.eval.num_problems:
        results[name] = r
        return
    results[name] = evaluate_phase(trainer, name, params, steps)

  base, base_steps = load_base(trainer)
  done("base", base, base_steps)
  reference = trainer.as_reference(base)
  stage1 = trainer.train_stage(1, base, reference)
  done("stage1", stage1, config.stage1.steps)
  stage2 = trainer.train_stage(2, stage1, reference)
  done("stage2", stage2, config.stage2.steps)
  report(workdir, results)
  return results


def evaluate_checkpoints(config, workdir: str) -> dict:
  """--config.mode=eval: restore checkpoints and evaluate them without training."""
  trainer = build(config, workdir)
  try:
    return _evaluate_checkpoints(trainer)
  finally:
    trainer.task.close()


def _evaluate_checkpoints(trainer: Trainer) -> dict:
  config, workdir = trainer.config, trainer.workdir
  if config.eval.checkpoint:
    targets = {os.path.basename(os.path.normpath(config.eval.checkpoint)): config.eval.checkpoint}
  else:
    targets = {p: os.path.join(workdir, p) for p in PHASES if os.path.isdir(os.path.join(workdir, p))}
  if not targets:
    raise FileNotFoundError(f"no checkpoints to evaluate in {workdir} (phases {PHASES}); "
                            f"train first or set --config.eval.checkpoint")
  results = {}
  for name, directory in targets.items():
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"config.eval.checkpoint: no such directory {directory}")
    step = checkpoints.latest_step(directory)
    params = trainer.restore_params(directory, step)
    results[name] = evaluate_phase(trainer, name, params, step)
  report(workdir, results)
  return results


def report(workdir: str, results: dict):
  out = os.path.join(workdir, "eval")
  evaluate.write_json(os.path.join(out, "table.json"), results)
  evaluate.plot_table(results, os.path.join(out, "table.png"))
  print("\nSelf-correction on held-out problems (greedy, two turns):\n" + evaluate.format_table(results))
  print(f"\nwritten: {out}/table.json, {out}/table.png, {out}/transcripts_*.jsonl")
