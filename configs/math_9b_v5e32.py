"""SCoRe on MATH with Gemma-2 9B (instruction-tuned) on a v5e-32 slice (8 hosts x 4 chips x 16 GiB).

    ACCELERATOR=v5litepod-32 RUNTIME=v2-alpha-tpuv5-lite launch/tpu_vm.sh run \
        configs/math_9b_v5e32.py gs://BUCKET/runs/math_9b

Everything as `configs/math.py` (the paper's batch of 512 episodes, 32 microbatches, the
sampler 64 episodes at a time, MATH / MATH500), with the 9B model from
weights/gemma-2-9b-it/ and a data x model mesh: 16-way FSDP over `data` and 2-way
tensor parallelism over `model` (`sharding.FSDP_TP_RULES`: heads, MLP hidden units and
the vocabulary split over `model`; the batch over `data`). The workdir must be one that
every host reaches: a gs:// URL (`pip install -e .[gcs]`) or a shared mount.

Memory per chip, from
  python -m score_jax.memory --model=gemma2_9b --batch=512 --seq_len=2176 --prompt_len=512 \
      --mesh=data:16,model:2 --microbatches=32 --sample_batch=64 --dtype=bfloat16 \
      --remat=true --hbm_gb=16
  live between steps (policy 1.08 + Adam 2.15 + bf16 reference 0.54)   3.77 GiB
  train peak (remat)                                                      7.86 GiB
  sampler peak                                                            5.41 GiB
  -> 7.9 of 16 GiB, fits. The same slice as pure FSDP (data:32) does not split 512
  episodes into 32 microbatches; gemma2_9b does not fit a v5e-16 (14.9 GiB of 16, above
  the 90% usable) nor a v4-16 (29.7 of 32 GiB).

Not yet run: a multi-host run needs process-local batches (issue 14), and this machine
has no TPU. tests/tensor_parallel_test.py proves the layout on 8 CPU devices.
"""
import importlib.util
import os

import ml_collections

from score_jax import config_defaults
from score_jax import sharding

WEIGHTS = "weights/gemma-2-9b-it"


def _math_config() -> ml_collections.ConfigDict:
  """configs/math.py's config (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "math_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "math.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _math_config()
  nine = config_defaults.gemma_config("gemma2_9b", WEIGHTS)
  c.model, c.tokenizer = nine.model, nine.tokenizer
  c.init.checkpoint = WEIGHTS
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 2), axes=(sharding.DATA_AXIS, sharding.MODEL_AXIS)))
  c.sharding_rules = [tuple(r) for r in sharding.FSDP_TP_RULES]
  return c
