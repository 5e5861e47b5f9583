r"""Entry point: python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

Every config field can be overridden on the command line
(--config.phases.stage2.steps=50). --config.mode=train runs the recipe's phases
(--config.recipe=score: base -> Stage I -> Stage II) with evaluation after each, resuming
from the workdir's checkpoints; --config.mode=eval restores checkpoints and evaluates them
without training.
"""
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from score_jax import recipes
from score_jax import run
from score_jax import sharding
from score_jax.recipes import ConfigError, check
from score_jax.tasks import formats
from score_jax.tasks import known_tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a Python module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer and reports.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host TPU slice: call jax.distributed.initialize() first "
    "(launch/tpu_vm.sh sets it for slices of more than one host).")


def _one_of(config, field: str, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  check(value in allowed, field, value, f"must be one of {tuple(allowed)}")


def check_config(config, num_devices: int):
  """Fails early, naming the field, instead of deep inside a compiled function."""
  _one_of(config, "mode", ("train", "eval"))
  phases = recipes.resolve(config)
  _one_of(config, "init.source", run.INIT_SOURCES)
  _one_of(config, "prompt_format", tuple(formats.PROMPT_FORMATS))
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
  for f in ("max_prompt_len", "max_len"):
    check(r[f] > 0, f"rollout.{f}", r[f], "must be positive")
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
  episodes = rl.num_prompts * rl.samples_per_prompt
  check(isinstance(rl.microbatches, int) and rl.microbatches > 0
        and episodes % (rl.microbatches * data_size) == 0, "rl.microbatches", rl.microbatches,
        f"must divide the {episodes} episodes per step into slices that are multiples of "
        f"the data axis size ({data_size})")
  check(r.batch_size >= 0 and (r.batch_size == 0 or (
      episodes % r.batch_size == 0 and r.batch_size % data_size == 0)), "rollout.batch_size",
      r.batch_size, f"must be 0 or divide the {episodes} episodes per step, in multiples of "
      f"the data axis size ({data_size})")
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
          "model's own tokenizer")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/demo")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  try:
    check_config(config, jax.device_count())
    print(f"devices: {jax.devices()}", flush=True)
    if config.mode == "eval":
      run.evaluate_checkpoints(config, workdir)
    else:
      run.train_and_evaluate(config, workdir)
  except ConfigError as e:  # Also a workdir trained under other settings.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
