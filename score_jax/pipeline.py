"""The whole run: tokenizer -> base model -> SCoRe Stage I -> Stage II, evaluating each.

How a run starts, phase by phase (big_vision style, decided once here):
  1. a phase whose checkpoint directory in the workdir is complete is skipped and its
     final params restored;
  2. a phase with a partial checkpoint resumes from its latest step;
  3. otherwise the phase starts: the base from `config.base` (trained here for the
     embedded task, or restored from `config.base.checkpoint`), Stage I from the base,
     Stage II from Stage I's final params. The frozen reference is always the base.
"""
import json
import os

import numpy as np

from score_jax import checkpoints
from score_jax import data
from score_jax import evaluate
from score_jax import sampling
from score_jax.tasks import get_task
from score_jax.tokenizer import Tokenizer
from score_jax.train import PHASES, Trainer


def load_or_train_tokenizer(config, workdir: str, task, fmt: data.PromptFormat) -> Tokenizer:
  if config.tokenizer.path:
    return Tokenizer.load(config.tokenizer.path)
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return Tokenizer.load(path)
  transcripts = task.base_transcripts(np.random.default_rng([config.seed, 99]),
                                      config.tokenizer.corpus_size)
  texts = [data.transcript_text(fmt, task, p, y1, y2) for p, y1, y2 in transcripts]
  print(f"training the tokenizer on {len(texts)} transcripts -> {path}", flush=True)
  return Tokenizer.train(texts, config.tokenizer.vocab_size, path)


def build(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  task = get_task(config.task)
  fmt = data.PromptFormat()
  tok = load_or_train_tokenizer(config, workdir, task, fmt)
  if tok.vocab_size != config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer has "
                     f"{tok.vocab_size} pieces")
  return Trainer(config, workdir, tok, task, fmt)


def evaluate_phase(trainer: Trainer, name: str, params, step=None) -> dict:
  """Greedy two-turn evaluation on held-out problems; writes eval/<name>.json + transcripts."""
  cfg = trainer.config.eval
  out_dir = os.path.join(trainer.workdir, "eval")
  problems = trainer.task.eval_problems(cfg.num_problems)
  result = evaluate.evaluate_policy(
      lambda batch, rng: trainer.rollout_and_score(params, batch, sampling.SampleParams.create(0.0), rng),
      problems, cfg.batch_size, os.path.join(out_dir, f"transcripts_{name}.jsonl"),
      cfg.num_transcripts)
  result.update(phase=name, checkpoint_step=step)
  evaluate.write_json(os.path.join(out_dir, f"{name}.json"), result)
  print(f"[eval {name}]\n{evaluate.format_table({name: result})}", flush=True)
  return result


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = build(config, workdir)
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

  if config.base.source == "sft":
    base = trainer.train_base()
    done("base", base, config.base.steps)
  else:
    base = trainer.restore_params(config.base.checkpoint)
    done("base", base, 0)
  stage1 = trainer.train_stage(1, base, base)
  done("stage1", stage1, config.stage1.steps)
  stage2 = trainer.train_stage(2, stage1, base)
  done("stage2", stage2, config.stage2.steps)
  report(workdir, results)
  return results


def evaluate_checkpoints(config, workdir: str) -> dict:
  """--config.mode=eval: restore checkpoints and evaluate them without training."""
  trainer = build(config, workdir)
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
    ckpt = checkpoints.Checkpointer(directory)
    step = ckpt.latest_step()
    ckpt.close()
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
