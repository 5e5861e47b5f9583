"""One persistent XLA compilation cache for the whole test run.

Most of the slow tests start `python -m score_jax.main` (or the experiments command) as a
subprocess on the same tiny configs, and each fresh process compiled the same sampler, loss
steps and evaluation again; the kill/resume tests even compile every program twice. The
subprocesses inherit this environment, so they share the cache with each other, with
this process and with the other xdist worker. It lives in a temporary directory of this
run only: a test never reads what an earlier run, or another version of the code, compiled.
"""
import os
import shutil
import tempfile

# The suite runs in two pytest-xdist workers (pytest.ini): the controller makes the
# directory, the workers inherit it through this variable, and only its maker removes it.
_OWNER = 'SCORE_JAX_TEST_XLA_CACHE' not in os.environ
if _OWNER:
  os.environ['SCORE_JAX_TEST_XLA_CACHE'] = tempfile.mkdtemp(prefix='score_jax_test_xla_cache_')
_CACHE = os.environ['SCORE_JAX_TEST_XLA_CACHE']
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
# The default (1 s) would skip most programs of the tiny test models.
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


def pytest_unconfigure(config):
  del config
  if _OWNER:
    shutil.rmtree(_CACHE, ignore_errors=True)
