"""VerifierPool: order, errors, hangs, crashes, throughput, and safety under JAX threads.

The verifier functions live at module level so that worker processes can unpickle them
(this module does not import JAX at the top, so workers stay light).
"""
import os
import signal
import time

import numpy as np
import pytest

from score_jax.tasks.rewards.verifiers import VerifierPool


def _square(x):
  return x * x


def _fail_on_odd(x):
  if x % 2:
    raise ValueError(f'odd {x}')
  return 1.0


def _hang_on(x, bad):
  if x == bad:
    while True:
      time.sleep(1)
  return float(x)


def _crash_on(x, bad, how):
  if x == bad:
    if how == 'exit':
      os._exit(0)  # A verifier (or generated code) that kills its process.
    if how == 'segv':
      os.kill(os.getpid(), signal.SIGSEGV)
  return float(x)


def _pid():
  time.sleep(0.05)  # Long enough that both workers get an item.
  return float(os.getpid())


def _sleep(s):
  time.sleep(s)
  return 1.0


def _alarm_works():
  """signal.alarm needs the main thread: true in the worker (math-verify relies on it)."""
  def on_alarm(*_):
    raise TimeoutError
  signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, 0.05)
  try:
    time.sleep(5)
  except TimeoutError:
    return 1.0
  return 0.0


def _not_a_number():
  return 'yes'


def _fail(message):
  raise ValueError(message)


class _BadInWorker:
  """Pickles fine here; unpickling in the worker raises, or kills the worker."""

  def __init__(self, kill):
    self.kill = kill

  def __reduce__(self):
    return (os._exit, (3,)) if self.kill else (_fail, ('cannot unpickle',))


@pytest.fixture(scope='module')
def pool():
  with VerifierPool(num_workers=2, timeout_s=1.0) as p:
    yield p


def test_results_in_order(pool):
  out = pool.map(_square, [(i,) for i in range(50)])
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np.arange(50, dtype=np.float32)**2)
  assert pool.map(_square, []).shape == (0,)


def test_exceptions_and_non_numbers_score_zero(pool):
  before = pool.stats['errors']
  np.testing.assert_array_equal(pool.map(_fail_on_odd, [(i,) for i in range(6)]),
                                [1, 0, 1, 0, 1, 0])
  assert pool.map(_not_a_number, [()])[0] == 0.0
  assert pool.stats['errors'] == before + 4


def test_signal_alarm_works_in_worker(pool):
  assert pool.map(_alarm_works, [()])[0] == 1.0


def test_hang_times_out_and_pool_recovers(pool):
  stats = pool.stats
  t0 = time.monotonic()
  out = pool.map(_hang_on, [(i, 3) for i in range(6)])
  elapsed = time.monotonic() - t0
  np.testing.assert_array_equal(out, [0, 1, 2, 0, 4, 5])
  # One timeout (1 s) on one worker while the other does the rest, plus a restart.
  assert elapsed < 1.0 * np.ceil(6 / 2) + 3.0, elapsed
  assert elapsed >= 1.0
  assert pool.stats['timeouts'] == stats['timeouts'] + 1
  assert pool.stats['worker_restarts'] == stats['worker_restarts'] + 1
  np.testing.assert_array_equal(pool.map(_square, [(i,) for i in range(4)]), [0, 1, 4, 9])


def test_every_item_hangs_within_bound():
  with VerifierPool(num_workers=2, timeout_s=0.5) as p:
    t0 = time.monotonic()
    out = p.map(_hang_on, [(1, 1)] * 4)
    elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(out, 0.0)
    assert 1.0 <= elapsed < 0.5 * 2 + 4.0, elapsed  # timeout * ceil(4/2) + slack.
    assert p.stats['timeouts'] == 4


@pytest.mark.parametrize('how', ['exit', 'segv'])
def test_crashed_worker_scores_zero_and_is_replaced(pool, how):
  restarts = pool.stats['worker_restarts']
  out = pool.map(_crash_on, [(i, 2, how) for i in range(5)])
  np.testing.assert_array_equal(out, [0, 1, 0, 3, 4])
  assert pool.stats['worker_restarts'] == restarts + 1
  pids = pool.map(_pid, [()] * 4)
  assert len(set(pids.tolist())) == 2 and all(pid > 0 for pid in pids)


def test_unpicklable_item_scores_zero(pool):
  restarts = pool.stats['worker_restarts']
  out = pool.map(_square, [(2,), (_BadInWorker(kill=False),), (3,)])
  np.testing.assert_array_equal(out, [4, 0, 9])
  assert pool.stats['worker_restarts'] == restarts  # An error, not a death.


def test_workers_that_die_at_start_up_raise_instead_of_looping():
  with VerifierPool(num_workers=2, timeout_s=5.0) as p:
    with pytest.raises(RuntimeError, match='before starting an item'):
      p.map(_square, [(_BadInWorker(kill=True),)] * 20)
    assert p.stats['worker_restarts'] < 20
    np.testing.assert_array_equal(p.map(_square, [(i,) for i in range(3)]), [0, 1, 4])


def test_throughput_uses_all_workers(pool):
  pool.map(_sleep, [(0.0,)] * 2)  # Workers already started.
  t0 = time.monotonic()
  out = pool.map(_sleep, [(0.1,)] * 8)
  elapsed = time.monotonic() - t0
  np.testing.assert_array_equal(out, 1.0)
  assert 0.4 <= elapsed < 0.75, elapsed  # 8 x 0.1 s on 2 workers: ~0.4 s, not 0.8 s.
  t0 = time.monotonic()
  pool.map(_square, [(i,) for i in range(1000)])
  assert time.monotonic() - t0 < 5.0  # Per-item overhead stays well under 5 ms.


def test_bad_arguments():
  with pytest.raises(ValueError, match='fork'):
    VerifierPool(start_method='fork')
  with pytest.raises(ValueError, match='module-level'):
    with VerifierPool(num_workers=1) as p:
      p.map(lambda: 1.0, [()])
  p = VerifierPool(num_workers=1)
  p.close()
  with pytest.raises(RuntimeError, match='close'):
    p.map(_square, [(1,)])


@pytest.mark.parametrize('start_method', ['forkserver', 'spawn'])
def test_works_after_jax_jit(start_method):
  """The parent has run a jitted computation (JAX threads alive): no fork deadlock."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  assert float(jax.jit(lambda x: (x * x).sum())(jnp.arange(4.0))) == 14.0
  with VerifierPool(num_workers=2, timeout_s=30.0, start_method=start_method) as p:
    np.testing.assert_array_equal(p.map(_square, [(i,) for i in range(6)]),
                                  np.arange(6.0)**2)
