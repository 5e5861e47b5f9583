r"""Entry point: python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

Every config field can be overridden on the command line (--config.stage2.steps=50).
--config.mode=train runs base -> Stage I -> Stage II with evaluation after each (and
resumes from the workdir's checkpoints); --config.mode=eval restores checkpoints and
evaluates them without training.
"""
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from score_jax.tasks import formats
from score_jax import pipeline
from score_jax import sharding
from score_jax.tasks import known_tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a Python module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer and reports.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host TPU slice: call jax.distributed.initialize() first "
    "(launch/tpu_vm.sh sets it for slices of more than one host).")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def _check(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _one_of(config, field: str, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  _check(value in allowed, field, value, f"must be one of {tuple(allowed)}")


def check_config(config, num_devices: int):
  """Fails early, naming the field, instead of deep inside a compiled function."""
  _one_of(config, "mode", ("train", "eval"))
  _one_of(config, "base.source", ("sft", "init", "checkpoint", "hf", "gguf", "gemma"))
  _one_of(config, "prompt_format", tuple(formats.PROMPT_FORMATS) + ("chat_template",))
  _one_of(config, "task.name", tuple(known_tasks()))
  _one_of(config, "rl.reference_dtype", ("float32", "bfloat16"))
  _one_of(config, "model.param_dtype", ("float32", "bfloat16"))
  _one_of(config, "rl.kl_estimator", ("k1", "k3"))
  _one_of(config, "rl.baseline", ("rloo", "batch_mean", "none"))
  m = config.model
  for f in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads", "num_kv_heads",
            "head_dim"):
    _check(isinstance(m[f], int) and m[f] > 0, f"model.{f}", m[f], "must be a positive integer")
  _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
         f"must divide model.num_heads={m.num_heads}")
  _one_of(config, "model.dtype", ("float32", "bfloat16"))
  for f in ("base.steps", "stage1.steps", "stage2.steps"):
    v = config[f.split(".")[0]][f.split(".")[1]]
    _check(isinstance(v, int) and v >= 0, f, v, "must be a non-negative integer")
  for f, v in (("stage1.beta1", config.stage1.beta1), ("stage1.beta2", config.stage1.beta2),
               ("stage2.beta1", config.stage2.beta1), ("stage2.alpha", config.stage2.alpha),
               ("stage1.learning_rate", config.stage1.learning_rate),
               ("stage2.learning_rate", config.stage2.learning_rate),
               ("base.learning_rate", config.base.learning_rate)):
    _check(v >= 0, f, v, "must be >= 0")
  r = config.rollout
  _check(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0 (0 = greedy)")
  _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
  _check(r.top_k >= 0, "rollout.top_k", r.top_k, "must be >= 0 (0 = off)")
  for f in ("max_prompt_len", "max_len_1", "max_len_2"):
    _check(r[f] > 0, f"rollout.{f}", r[f], "must be positive")
  rl = config.rl
  if rl.baseline == "rloo":
    _check(rl.samples_per_prompt >= 2, "rl.samples_per_prompt", rl.samples_per_prompt,
           "RLOO needs at least 2 samples per prompt (or set --config.rl.baseline=batch_mean)")
  data_size = num_devices
  if list(config.mesh.shape) != [-1]:
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    data_size = sharding.data_axis_size(mesh)
  episodes = rl.num_prompts * rl.samples_per_prompt
  _check(isinstance(rl.microbatches, int) and rl.microbatches > 0
         and episodes % (rl.microbatches * data_size) == 0, "rl.microbatches", rl.microbatches,
         f"must divide the {episodes} episodes per step into slices that are multiples of "
         f"the data axis size ({data_size})")
  _check(r.batch_size >= 0 and (r.batch_size == 0 or (
      episodes % r.batch_size == 0 and r.batch_size % data_size == 0)), "rollout.batch_size",
      r.batch_size, f"must be 0 or divide the {episodes} episodes per step, in multiples of "
      f"the data axis size ({data_size})")
  for f, v in (("rl.num_prompts * rl.samples_per_prompt", episodes),
               ("base.batch_size", config.base.batch_size),
               ("eval.batch_size", config.eval.batch_size)):
    _check(v > 0 and v % data_size == 0, f, v,
           f"must be a positive multiple of the data axis size ({data_size} devices)")
  _check(config.eval.num_problems > 0, "eval.num_problems", config.eval.num_problems, "must be > 0")
  uses_checkpoint = config.base.source in ("checkpoint", "hf", "gguf", "gemma")
  for f, path in (("tokenizer.path", config.tokenizer.path),
                  ("eval.checkpoint", config.eval.checkpoint),
                  ("eval.repair_path", config.eval.repair_path),
                  ("base.checkpoint", config.base.checkpoint if uses_checkpoint else "")):
    _check(not path or os.path.exists(path), f, path, "no such file or directory")
  if uses_checkpoint:
    _check(bool(config.base.checkpoint), "base.checkpoint", config.base.checkpoint,
           f"required when base.source={config.base.source!r}")
  _check(config.prompt_format != "chat_template" or bool(config.tokenizer.path),
         "tokenizer.path", config.tokenizer.path,
         "prompt_format='chat_template' reads the template from the model's tokenizer")
  if config.base.source != "sft":
    _check(bool(config.tokenizer.path) or config.base.source == "init", "tokenizer.path",
           config.tokenizer.path, f"required with pretrained weights (base.source="
           f"{config.base.source!r}): the model's own tokenizer.model, tokenizer.json "
           f"directory or .gguf file")


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
  try:
    check_config(config, jax.device_count())
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  print(f"devices: {jax.devices()}", flush=True)
  if config.mode == "eval":
    pipeline.evaluate_checkpoints(config, workdir)
  else:
    pipeline.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
