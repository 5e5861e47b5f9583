"""One persistent XLA compilation cache for the whole test run.

Most of the slow tests start `python -m score_jax.main` (or the experiments command) as a
subprocess on the same tiny configs, and each fresh process compiled the same sampler, loss
steps and evaluation again; the kill/resume tests even compile every program twice. The
subprocesses inherit this environment, so they share the cache with each other and with
this process. It lives in a temporary directory of this run only: a test never reads what
an earlier run, or another version of the code, compiled.
"""
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix='score_jax_test_xla_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
# The default (1 s) would skip most programs of the tiny test models.
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


def pytest_unconfigure(config):
  del config
  shutil.rmtree(_CACHE, ignore_errors=True)
