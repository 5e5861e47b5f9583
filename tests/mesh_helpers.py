"""Helpers for tests that run one computation on several device meshes and compare.

The device count is fixed when jax starts, and a pytest process may already have started
it with one device, so such tests run their checks in a child process: the test file run
as a script, with XLA_FLAGS forcing 8 host devices (`run_child`). In the child, `mesh`
takes the first devices for any data x model shape, and `place` lays a tree out by
partition rules, so one child compares every mesh against one device.
"""
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSED = 'all mesh checks passed'  # the last line a child prints when it succeeds
MESH_SHAPES = ((1, 1), (8, 1), (4, 2), (2, 4))  # data x model


def run_child(script: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs `python script` with `devices` CPU devices; asserts it printed PASSED. -> stdout."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={devices}').strip())
  proc = subprocess.run([sys.executable, os.path.abspath(script)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert PASSED in proc.stdout, proc.stdout[-3000:]
  return proc.stdout


def mesh(shape, axes=('data', 'model')):
  """A mesh over the first prod(shape) devices."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  devices = np.asarray(jax.devices()[:math.prod(shape)]).reshape(shape)
  return Mesh(devices, axes)


def place(mesh_, tree, rules):
  """(tree on the mesh by the partition rules, its shardings)."""
  import jax
  from score_jax import sharding
  shardings = sharding.param_shardings(mesh_, tree, rules)
  return jax.device_put(tree, shardings), shardings


def assert_trees_close(got, want, tol, what):
  """Every leaf within `tol` absolute or relative (float32 sums in another order)."""
  import jax
  import numpy as np
  from score_jax import sharding
  for path, g, w in zip(jax.tree.leaves(sharding.tree_paths(want)), jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol,
                               err_msg=f'{what}: {path}')
