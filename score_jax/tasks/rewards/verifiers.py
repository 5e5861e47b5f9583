"""A bounded pool of verifier processes with a per-item deadline.

Verifiers (sympy equivalence, running generated code) are slow, may hang and may crash, so
they run outside the compiled step in worker processes, and one stuck item must cost at most
its timeout, never the run. Why not `concurrent.futures.ProcessPoolExecutor`: it cannot kill
one stuck worker (a timeout there means recycling the whole pool), and a worker that dies
breaks the executor. Here each worker has its own pipe, the parent knows which item each
worker holds and since when, and it kills and replaces exactly the worker that is late or
dead; that item scores 0.0.

Workers are started with 'forkserver' (or 'spawn'), never a bare fork: the trainer has JAX
initialised, and forking a process with live threads can deadlock the child.

Deadline of an item: `timeout_s` from the moment the worker reports it has unpickled the
item (so importing the verifier's module in a fresh worker is not charged to the item), and
at most `timeout_s + startup_grace_s` from dispatch (so a worker stuck while importing is
still caught). Three workers in a row lost before reading their item raise an error
instead of being replaced forever (a broken start-up repeats in every replacement).

Each worker leads its own process group, so killing it also kills subprocesses its
verifier started in that group. (Code tasks do not use this pool: `sandbox.run_many`
bounds each program itself, in its own session.)
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

_START, _DONE, _ERROR = 'start', 'done', 'error'
_MAX_STARTUP_FAILURES = 3
_ZERO_STATS = dict(items=0, timeouts=0, errors=0, worker_restarts=0)


def _worker_main(conn) -> None:
  """Worker loop: run `fn(*args)` for each (fn, args) received; None means stop.

  The function runs in this process's main thread, so verifiers may use `signal.alarm`.
  """
  try:
    os.setpgrp()  # Own process group: the parent kills the group, children included.
  except OSError:
    pass
  _die_with_parent()
  while True:
    try:
      data = conn.recv_bytes()
    except (EOFError, OSError):
      return  # The parent is gone.
    try:
      msg = pickle.loads(data)  # Imports the verifier's module on first use.
      if msg is None:
        return
      fn, args = msg
      conn.send((_START, None))
      value = float(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except  (SystemExit included)
      conn.send((_ERROR, f'{type(e).__name__}: {e}'[:500]))
    else:
      conn.send((_DONE, value))


def _die_with_parent() -> None:
  """Linux: get SIGKILL when the parent (the forkserver / the trainer) exits.

  Without it a worker stuck in an endless verifier would outlive a trainer killed with -9.
  """
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
  except (OSError, AttributeError):
    pass


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  index: int | None = None      # Item it holds, None when idle.
  deadline: float = 0.0         # time.monotonic() by which it must answer.
  started: bool = False         # Has reported that it unpickled the item.


def _kill(process) -> None:
  """SIGKILL the worker's process group (its own pid), then the worker itself."""
  if process.pid is not None:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
      pass
  try:
    process.kill()
  except (ValueError, AttributeError, OSError):
    pass  # Already closed or never started.
  process.join(timeout=5)


def _shutdown(workers: list[_Worker]) -> None:
  """Stop all workers: ask idle ones to exit, kill the rest (also run at exit by finalize)."""
  for w in workers:
    if w.index is None:
      try:
        w.conn.send(None)
      except (OSError, ValueError):
        pass
  deadline = time.monotonic() + 1.0
  for w in workers:
    w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    if w.process.is_alive():
      _kill(w.process)
    w.conn.close()
  workers.clear()


class VerifierPool:
  """`map(fn, args)` -> float32 rewards, each item under a deadline; see the module doc."""

  def __init__(self, num_workers: int = 0, timeout_s: float = 10.0,
               start_method: str = 'forkserver', startup_grace_s: float = 60.0):
    if start_method not in ('forkserver', 'spawn'):
      raise ValueError(f"start_method must be 'forkserver' or 'spawn' (never a bare fork "
                       f'of a process with JAX threads), got {start_method!r}')
    if num_workers < 0:
      raise ValueError(f'num_workers must be >= 0 (0 = os.cpu_count()), got {num_workers}')
    if timeout_s <= 0:
      raise ValueError(f'timeout_s must be > 0, got {timeout_s}')
    self.num_workers = num_workers or os.cpu_count() or 1
    self.timeout_s = float(timeout_s)
    self.startup_grace_s = float(startup_grace_s)
    self._ctx = multiprocessing.get_context(start_method)
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()  # map() is not reentrant: one batch at a time.
    self._stats = dict(_ZERO_STATS)
    self._startup_failures = 0  # Consecutive workers lost before starting an item.
    self._finalizer = weakref.finalize(self, _shutdown, self._workers)

  @property
  def stats(self) -> dict:
    """Cumulative counts since construction, for metrics."""
    return dict(self._stats)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self._finalizer()

  # -- workers --------------------------------------------------------------------------

  def _start_worker(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(child_conn,), daemon=True,
                                name='score_jax-verifier')
    process.start()
    child_conn.close()  # Only the child holds it now, so its death reads as EOF here.
    worker = _Worker(process, parent_conn)
    self._workers.append(worker)
    return worker

  def _replace(self, worker: _Worker) -> None:
    _kill(worker.process)
    worker.conn.close()
    self._workers.remove(worker)
    self._stats['worker_restarts'] += 1

  # -- the batch ------------------------------------------------------------------------

  def map(self, fn: Callable[..., float], args: Sequence[tuple]) -> np.ndarray:
    """`fn(*a)` for each `a` in `args`, in order, as float32; raised or late -> 0.0.

    `fn` must be picklable (a module-level function). Worst case (every item hangs) the
    call takes about `timeout_s * ceil(len(args) / num_workers)` plus worker restarts.
    """
    if not self._finalizer.alive:  # closed
      raise RuntimeError('VerifierPool.map called after close()')
    args = [tuple(a) for a in args]
    out_N = np.zeros(len(args), np.float32)
    if not args:
      return out_N
    try:
      pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
      raise ValueError(f'verifier {fn!r} cannot be sent to a worker process; use a '
                       f'module-level function: {e}') from e
    with self._lock:
      try:
        self._run(fn, args, out_N)
      except BaseException:
        # Interrupted (Ctrl-C, unpicklable args): workers still holding an item would
        # answer into the next batch, so replace them.
        for worker in [w for w in self._workers if w.index is not None]:
          self._replace(worker)
        raise
      self._stats['items'] += len(args)
    return out_N

  def _run(self, fn, args: list[tuple], out_N: np.ndarray) -> None:
    while len(self._workers) < min(self.num_workers, len(args)):
      self._start_worker()
    pending = list(range(len(args) - 1, -1, -1))  # A stack, popped from index 0 up.
    busy = 0
    while pending or busy:
      for worker in list(self._workers):
        if worker.index is None and pending:
          index = pending.pop()
          try:
            worker.conn.send((fn, args[index]))
          except OSError:
            # Died while idle: replace it and retry the item on another worker.
            pending.append(index)
            self._replace(worker)
            self._start_worker()
            continue
          worker.index, worker.started = index, False
          worker.deadline = time.monotonic() + self.timeout_s + self.startup_grace_s
          busy += 1
      busy -= self._collect(out_N)

  def _collect(self, out_N: np.ndarray) -> int:
    """Waits for the next event (a message, a death, a deadline); returns items finished."""
    active = [w for w in self._workers if w.index is not None]
    if not active:
      return 0
    now = time.monotonic()
    wait_s = max(0.0, min(w.deadline for w in active) - now)
    by_handle = {}
    for w in active:
      by_handle[w.conn] = w
      by_handle[w.process.sentinel] = w
    ready = multiprocessing.connection.wait(list(by_handle), timeout=wait_s)
    finished, seen = 0, set()
    for handle in ready:
      worker = by_handle[handle]
      if id(worker) in seen:
        continue
      seen.add(id(worker))
      finished += self._read(worker, out_N)
    now = time.monotonic()
    for worker in [w for w in active if id(w) not in seen]:
      if worker.index is not None and now >= worker.deadline:
        self._stats['timeouts'] += 1
        self._finish_dead(worker, out_N)
        finished += 1
    return finished

  def _read(self, worker: _Worker, out_N: np.ndarray) -> int:
    """Drains a worker's messages; returns 1 if its item finished (done, error or death)."""
    try:
      while worker.conn.poll():
        kind, value = worker.conn.recv()
        if kind == _START:
          worker.started = True
          self._startup_failures = 0
          worker.deadline = min(worker.deadline, time.monotonic() + self.timeout_s)
          continue
        out_N[worker.index] = value if kind == _DONE else 0.0
        if kind == _ERROR:
          self._stats['errors'] += 1
        worker.index = None
        return 1
    except (EOFError, OSError):
      pass
    if worker.process.is_alive():
      if time.monotonic() < worker.deadline:
        return 0  # Only the start message so far.
      self._stats['timeouts'] += 1
    else:
      self._stats['errors'] += 1  # Died mid-item (os._exit, segfault, out of memory).
    self._finish_dead(worker, out_N)
    return 1

  def _finish_dead(self, worker: _Worker, out_N: np.ndarray) -> None:
    out_N[worker.index] = 0.0
    worker.index = None
    self._replace(worker)
    if not worker.started:
      # Died or hung before it could even read its item: a broken worker start-up (an
      # unguarded main module, a failing import), which every replacement would repeat.
      self._startup_failures += 1
      if self._startup_failures >= _MAX_STARTUP_FAILURES:
        raise RuntimeError(
            f'{self._startup_failures} verifier workers in a row died or hung before '
            f'starting an item; see their stderr above (a script that starts a pool must '
            f"guard its top level with `if __name__ == '__main__':`)")
    self._start_worker()


class PooledGrading:
  """Mixin for tasks: `self.pooled(fn, args)` grades in a lazily started `VerifierPool`.

  Reads `self.config.verifier_workers` (0 = in the trainer's process, for debugging: no
  timeout guarantee) and `self.config.verifier_timeout_s`. `close()` stops the workers.
  """

  _pool: VerifierPool | None = None

  def pooled(self, fn: Callable[..., float], args: Sequence[tuple]) -> np.ndarray:
    if not args:
      return np.zeros(0, np.float32)
    if self.config.verifier_workers <= 0:
      return np.asarray([fn(*a) for a in args], np.float32)
    if self._pool is None:
      self._pool = VerifierPool(num_workers=self.config.verifier_workers,
                                timeout_s=self.config.verifier_timeout_s)
    return self._pool.map(fn, args)

  @property
  def verifier_stats(self) -> dict:
    """The pool's counts (items, timeouts, errors, worker_restarts), for metrics."""
    if self._pool is None:
      return dict(_ZERO_STATS)
    return self._pool.stats

  def reward_stats(self) -> dict[str, float]:
    """`Task.reward_stats`: the pool's cumulative timeouts and errors (items scored 0)."""
    stats = self.verifier_stats
    return {'verifier_timeouts': float(stats['timeouts']),
            'verifier_errors': float(stats['errors'])}

  def close(self):
    if self._pool is not None:
      self._pool.close()
      self._pool = None
