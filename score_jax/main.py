r"""Entry point: python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

Every config field can be overridden on the command line
(--config.phases.stage2.steps=50). --config.mode=train runs the recipe's phases
(--config.recipe=score: base -> Stage I -> Stage II) with evaluation after each, resuming
from the workdir's checkpoints; --config.mode=eval restores checkpoints and evaluates them
without training.
"""
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from score_jax import config_defaults
from score_jax import run
from score_jax.recipes import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a Python module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer and reports.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Several processes (the hosts of a slice): call "
    "jax.distributed.initialize() first (launch/tpu_vm.sh sets it for slices of more than "
    "one host; on TPU and GPU clusters it finds its peers by itself).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "With --distributed, where no cluster is detected (e.g. several "
    "processes on one machine): host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "With --distributed: seconds after which a process that "
    "stopped answering is declared dead and the others exit with an error.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/demo")
  if "://" in workdir:
    # Checkpoints and metrics could go to a URL, but the run's other files (config,
    # tokenizer, evaluation, transcripts) are written with local file calls.
    raise app.UsageError(f"--workdir={workdir}: a URL workdir is not supported; mount the "
                         "bucket (e.g. gcsfuse) and give its local path")
  if _DISTRIBUTED.value:
    # CPU collectives between processes (tests, one-machine runs); TPU and GPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  try:
    config_defaults.check(config, jax.device_count())
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
