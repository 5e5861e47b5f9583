"""Runs untrusted, model-written Python against unit tests, in a child process.

Only `run_tests`, `run_many`, `test_plan` and `isolation_report` are public. A run is one
fresh child:

  trainer --Popen(start_new_session)--> [unshare --net --pid --mount --mount-proc --fork]
      --> harness = `python -I -S -c <sandbox_harness.py>` (pid 1 of a new pid namespace)
            trusted phase: read {program, tests, test plan} from stdin, stdin := /dev/null,
            size-capped tmpfs on every world-writable dir (/tmp, /var/tmp, /dev/shm,
            /run/lock) with the work dir there, rlimits (CPU, address space, file size,
            processes, open files, no core), a per-run unprivileged uid/gid (root only),
            no_new_privs, not dumpable, a seccomp filter (no signal handlers, no threads),
            snapshots of what the tests use, an audit hook (no frames, gc referrers,
            sockets, ctypes, tracers, new hooks).
            untrusted phase: exec(program); the tests in their own namespace, every value
            a program function returns checked (exact builtin types only).
            proof: see below; then os._exit.
See sandbox_harness.py for what the tests' namespace holds and what is checked when.

Isolation by platform (`isolation_report()` says which is in force; measured on the
development VM, root, kernel 6.18, util-linux 2.38: mode `root-namespaces`):
  root-namespaces  root + working `unshare`: new net/pid/mount namespaces, per-run uid.
                   Network: only a down loopback. Process limit: RLIMIT_NPROC works because
                   the uid is not root and is unique to the run. Kill-all: when pid 1 (the
                   harness) dies the kernel kills every process of the namespace, so
                   orphans that setsid() die too; the trainer SIGKILLs the session on
                   timeout. Files: the uid owns nothing outside the tmpfs work dir.
  userns           non-root with user namespaces (`unshare --user --map-root-user`): the
                   same namespaces, but the code runs as the trainer's own uid (mapped to
                   0), so every mount is bind-remounted read-only and all capabilities are
                   dropped (capset) before candidate code runs; RLIMIT_NPROC counts the
                   trainer's user. Exercised here only by forcing it as root.
  plain            no namespaces: own session, rlimits, minimal env, temp dir, per-run
                   uid if root; no network isolation except the audit hook (weak), and
                   a setsid() orphan survives unless root (then everything of the run's
                   uid is SIGKILLed). As root with a stdlib an unprivileged uid cannot
                   reach (this VM: /root is 0700) it refuses to run anything, since root
                   ignores RLIMIT_NPROC. Stated in the report.

Proof of success and its threat model. Reward is given only when the parent reads
exactly `b'D' + nonce` on a private result pipe and the child exited 0 in time. The nonce
(secrets.token_hex, per run) is not in the child at all while candidate code can run: the
child writes `D` ("tests returned") after the tests, the parent only then writes the nonce
into a second pipe, and the harness echoes it back. Hence these earn nothing: exiting early
(sys.exit(0), os._exit(0), SystemExit / KeyboardInterrupt / SkipTest / any BaseException in
a test: the harness catches BaseException and reports failure), printing a fake success
line (stdout is not the result pipe), searching memory or frames for the nonce during the
tests (it is not there yet), forking a copy of the harness (only the original pid may
answer, and a second `D` spoils the exact match). The tests' verdict itself is protected
by the harness (sandbox_harness.py): values compared are exact builtins (always-equal
objects, builtin subclasses, `__class__` spoofing and metaclasses are rejected: status
'rejected'); builtins and imported modules patched by the program are rejected too; the
tests' own builtins and modules are private copies; frames (where the tests' data and the
harness's state live) are unreachable. tests/reward_hacks_test.py runs each family.

Not defended, by design of a single-interpreter harness: code written against this
harness that writes `D` to the result fd itself and echoes the nonce (the fds are in
argv); a C-level memory writer (ctypes is blocked by the audit hook, a second layer, not
a boundary); in-place changes to mutable state inside stdlib modules the tests use (e.g.
`copy._deepcopy_dispatch[list] = ...`: only module and class dicts are compared); and
weak tests -- the sandbox proves the tests ran to the end on real values, not that the
tests are strong. The seccomp filter exists for x86_64 and aarch64 only.
"""
from __future__ import annotations

import ast
import builtins
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

# Per-run uids/gids when running as root: a block nobody else uses, one uid per concurrent
# run, so RLIMIT_NPROC (counted per real uid) bounds each run separately.
_UID_BASE, _UID_COUNT = 610_000, 20_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()
_RESULT_CAP = 256  # Bytes read from the result pipe; a valid answer is 1 + 64.


@dataclasses.dataclass(frozen=True)
class Limits:
  cpu_s: float = 5.0          # RLIMIT_CPU of the child (SIGKILL at the limit).
  wall_s: float = 10.0        # Wall clock from spawn; then the whole session is SIGKILLed.
  memory_mb: int = 1024       # RLIMIT_AS (address space) of the child.
  file_size_mb: int = 16      # RLIMIT_FSIZE per file; the tmpfs work dir holds 4x this.
  max_processes: int = 32     # RLIMIT_NPROC of the run's own uid.
  output_bytes: int = 64_000  # Kept tail of stdout and of stderr; the rest is drained.


@dataclasses.dataclass(frozen=True)
class Result:
  passed: bool       # True only if the harness echoed this run's nonce after the tests.
  # 'passed'; 'failed' (a test or the program raised, incl. SystemExit); 'rejected' (a
  # value the program returned was not made of builtin types, or it patched what the tests
  # use: `reason` says which); 'exited' (the child ended without finishing the tests,
  # e.g. os._exit(0)); 'killed' (a signal, e.g. the CPU limit); 'timeout' (wall limit);
  # 'error' (the sandbox itself failed to run).
  status: str
  wall_s: float
  stdout_tail: str
  stderr_tail: str
  returncode: int | None = None
  reason: str = ''         # why 'rejected', as the harness wrote it
  audit_blocked: int = 0   # operations the harness's audit hook refused
  flooded: bool = False    # stdout or stderr overflowed its kept tail

  @property
  def hack(self) -> str:
    """'nonbuiltin' (a returned value was not made of builtin types), 'patched' (the
    program changed builtins or modules the tests use) or '' (not rejected)."""
    if self.status != 'rejected':
      return ''
    return 'patched' if self.reason.startswith('patched') else 'nonbuiltin'


# The harness (sandbox_harness.py), sent as text: the child needs no file of this repository.
_HARNESS = (pathlib.Path(__file__).parent / 'sandbox_harness.py').read_text()


@functools.lru_cache(maxsize=4096)
def test_plan(tests: str) -> tuple[tuple[tuple[str, bool], ...], tuple[str, ...]]:
  """What the harness must know of trusted test code before candidate code runs:
  ((name, raw), ...) for each name the tests take from the program, and the modules the
  tests import (with their parent packages).

  A program name is wrapped (every value it returns is checked) unless it is `raw`: the
  tests only call it to build the arguments of another program call, as MBPP's
  `max_chain_length([Pair(5, 24), ...], 4)` builds `Pair`s, whose instances are not
  results. Builtin names are never taken from the program: the tests' `len` is the real one.
  """
  try:
    tree = ast.parse(tests)
  except SyntaxError:
    return (), ()  # the harness reports the SyntaxError
  bound, imports = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
      bound.add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      bound.add(node.name)
    elif isinstance(node, ast.Import):
      bound.update((a.asname or a.name).partition('.')[0] for a in node.names)
      imports.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      bound.update(a.asname or a.name for a in node.names)
      imports.add(node.module)
  loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
  program = loaded - bound - set(dir(builtins))
  uses = collections.defaultdict(set)

  def visit(node, in_arguments: bool):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in program:
      uses[node.func.id].add('argument' if in_arguments else 'call')
      for child in [*node.args, *(k.value for k in node.keywords)]:
        visit(child, True)
      return
    if isinstance(node, ast.Name) and node.id in program:
      uses[node.id].add('value')
    for child in ast.iter_child_nodes(node):
      visit(child, in_arguments)

  visit(tree, False)
  modules = {'.'.join(m.split('.')[:i + 1]) for m in imports for i in range(m.count('.') + 1)}
  return tuple(sorted((n, uses[n] == {'argument'}) for n in program)), tuple(sorted(modules))


# ---------------------------------------------------------------------------------------
# Which isolation this platform allows (probed once).


def _unshare_args(user_ns: bool) -> list[str]:
  args = ['unshare', '--net', '--pid', '--fork', '--mount', '--mount-proc', '--kill-child']
  return args[:1] + ['--user', '--map-root-user'] + args[1:] if user_ns else args


def _probe(args: list[str]) -> bool:
  try:
    return subprocess.run(args + ['true'], capture_output=True, timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@functools.lru_cache(maxsize=None)
def _isolation() -> str:
  """'root-namespaces' | 'userns' | 'plain'; `SCORE_SANDBOX_ISOLATION` may force a weaker one."""
  forced = os.environ.get('SCORE_SANDBOX_ISOLATION', 'auto')
  if forced not in ('auto', 'root-namespaces', 'userns', 'plain'):
    raise ValueError(f'SCORE_SANDBOX_ISOLATION={forced!r}; expected auto, '
                     'root-namespaces, userns or plain')
  have_unshare = shutil.which('unshare') is not None
  root = os.geteuid() == 0
  if forced in ('auto', 'root-namespaces') and root and have_unshare and _probe(
      _unshare_args(user_ns=False)):
    return 'root-namespaces'
  if forced in ('auto', 'root-namespaces', 'userns') and have_unshare and _probe(
      _unshare_args(user_ns=True)):
    return 'userns'
  return 'plain'


def _seccomp_report() -> str:
  if os.uname().machine in ('x86_64', 'aarch64'):
    return 'seccomp filter: no signal handlers, no threads'
  return f'NO seccomp filter on {os.uname().machine}: signal handlers can see frames'


def isolation_report() -> str:
  """What isolation is actually in force for runs on this machine, in words."""
  mode = _isolation()
  common = ('own session/process group, SIGKILL of the session at the wall limit; rlimits '
            'CPU, address space, file size, processes, open files, no core; env only '
            'PATH/LANG/HOME/TMPDIR; `python -I -S`; stdin=/dev/null; output tails capped; '
            'not dumpable; ' + _seccomp_report() + '; audit hook blocks frames, gc '
            'referrers, socket, ctypes, settrace (second layer only); results checked to '
            'be builtin values; nonce proof')
  if mode == 'root-namespaces':
    return (f'{mode}: new network namespace (no interfaces up: no network), new pid '
            'namespace (everything dies with the harness, setsid orphans included), new '
            'mount namespace with size-capped tmpfs over /tmp, /var/tmp, /dev/shm, '
            '/run/lock (work dir inside), per-run unprivileged uid/gid and no_new_privs; '
            + common)
  if mode == 'userns':
    return (f'{mode}: user+network+pid+mount namespaces (no network; everything dies with '
            'the harness; tmpfs over world-writable dirs); the code runs with the '
            "trainer's own uid (mapped to 0), so all other mounts are remounted read-only "
            'and every capability is dropped; RLIMIT_NPROC counts the trainer\'s whole '
            'user (unlimited if that is root); ' + common)
  if os.geteuid() == 0 and _stdlib_exposure() is not None:
    return (f'{mode}: REFUSES to run programs: root without namespaces, and an '
            f'unprivileged uid cannot reach {_stdlib_exposure()[1]} (RLIMIT_NPROC would '
            'not bind root)')
  return (f'{mode}: NO network or pid namespace (unshare unavailable): network is blocked '
          'only by the audit hook (bypassable); a setsid() orphan survives the run'
          + (' unless killed by uid (root: per-run uid, all its processes are SIGKILLed)'
             if os.geteuid() == 0 else '') + '; ' + common)


# ---------------------------------------------------------------------------------------
# One run.


@functools.lru_cache(maxsize=None)
def _stdlib_exposure() -> tuple[str, str] | None:
  """(dir to hide, stdlib prefix) when another uid cannot reach the interpreter's stdlib.

  On this VM Python lives under /root (mode 0700), so a run as an unprivileged uid could
  not import anything; in a mount namespace the harness hides that dir and binds the
  prefix back. None when every ancestor is traversable by others.
  """
  prefix = os.path.realpath(sys.base_prefix)
  path = '/'
  for part in prefix.strip('/').split('/'):
    path = os.path.join(path, part)
    if not os.stat(path).st_mode & 0o001:
      return (path, prefix)
  return None


def _next_uid() -> int:
  with _uid_lock:
    return _UID_BASE + next(_uid_counter) % _UID_COUNT


def _child_command(mode: str, cfg: dict) -> list[str]:
  harness = [sys.executable, '-I', '-S', '-c', _HARNESS, json.dumps(cfg)]
  if mode == 'plain':
    return harness
  return _unshare_args(user_ns=(mode == 'userns')) + harness


class _Tail:
  """Keeps the last `cap` bytes of a stream while draining all of it."""

  def __init__(self, cap: int):
    self.cap, self.buf, self.total = cap, bytearray(), 0

  def add(self, data: bytes):
    self.total += len(data)
    self.buf += data[-self.cap:]
    if len(self.buf) > self.cap:
      del self.buf[:len(self.buf) - self.cap]

  def text(self) -> str:
    return self.buf.decode('utf-8', 'replace')


def _kill_uid(uid: int):
  """SIGKILLs every process of `uid` (root only): plain mode's catch for setsid orphans."""
  subprocess.run(['setpriv', f'--reuid={uid}', f'--regid={uid}', '--clear-groups',
                  'kill', '-9', '-1'], capture_output=True, timeout=10)


def run_tests(program: str, tests: str, limits: Limits = Limits()) -> Result:
  """Runs `program`, then `tests` against it, in a fresh sandboxed child process.

  The tests run in their own namespace and see the program's names that they use
  (`test_plan`), wrapped so that every value returned is checked to be made of builtin
  types. `passed` is True only when the harness proved that the tests returned normally;
  every other outcome (assertion, exception, rejected value, early exit, signal, timeout)
  is passed=False.
  """
  mode = _isolation()
  root = os.geteuid() == 0
  if mode == 'plain' and root and _stdlib_exposure() is not None:
    # Root ignores RLIMIT_NPROC: a fork bomb would be unbounded on the host. Refuse.
    return Result(False, 'error', 0.0, '', 'sandbox refuses to run: root without '
                  'namespaces, and the stdlib is unreachable for an unprivileged uid')
  # Root drops to a per-run uid (userns already runs as the trainer's own, mapped uid).
  uid = _next_uid() if root and mode != 'userns' else None
  nonce = secrets.token_hex(32).encode()
  workdir = tempfile.mkdtemp(prefix='score_sbx_')
  res_r, res_w = os.pipe()
  nonce_r, nonce_w = os.pipe()
  events_r, events_w = os.pipe()
  cfg = dict(result_fd=res_w, nonce_fd=nonce_r, events_fd=events_w, workdir=workdir, uid=uid,
             mount_tmpfs=mode != 'plain', readonly_root=mode == 'userns',
             expose=_stdlib_exposure() if mode == 'root-namespaces' else None,
             tmpfs=[('/tmp', limits.file_size_mb * 4096), ('/var/tmp', 1024),
                    ('/dev/shm', 1024), ('/run/lock', 64)],
             cpu_s=max(1, int(round(limits.cpu_s))), as_bytes=limits.memory_mb << 20,
             fsize_bytes=limits.file_size_mb << 20, nproc=limits.max_processes)
  env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': workdir, 'TMPDIR': workdir}
  out, err, result = _Tail(limits.output_bytes), _Tail(limits.output_bytes), bytearray()
  events = _Tail(0)  # one byte per operation the audit hook refused: only counted
  start = time.monotonic()
  try:
    proc = subprocess.Popen(_child_command(mode, cfg), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(res_w, nonce_r, events_w), start_new_session=True,
                            env=env,
                            cwd=workdir)
  except OSError as e:
    for fd in (res_r, res_w, nonce_r, nonce_w, events_r, events_w):
      os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    return Result(False, 'error', 0.0, '', f'sandbox could not start: {e}')
  for fd in (res_w, nonce_r, events_w):
    os.close(fd)
  names, imports = test_plan(tests)
  payload = json.dumps({'program': program, 'tests': tests, 'names': names,
                        'imports': imports}).encode()
  timed_out = False
  with selectors.DefaultSelector() as sel:
    for f in (proc.stdin, proc.stdout, proc.stderr):
      os.set_blocking(f.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE, 'in')
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    sel.register(res_r, selectors.EVENT_READ, result)
    sel.register(events_r, selectors.EVENT_READ, events)
    deadline = start + limits.wall_s
    exited_at = None
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        timed_out = True
        break
      if exited_at is None and proc.poll() is not None:
        exited_at = now
      if exited_at is not None and now > exited_at + 0.5:
        break  # the child is gone but something it left holds our pipes
      for key, _ in sel.select(timeout=min(0.1, deadline - now)):
        if key.data == 'in':
          try:
            sent = os.write(key.fileobj.fileno(), payload)
            payload = payload[sent:]
          except BlockingIOError:
            continue
          except BrokenPipeError:
            payload = b''  # the child died before reading its input
          if not payload:
            sel.unregister(key.fileobj)
            proc.stdin.close()
          continue
        fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
        try:
          data = os.read(fd, 1 << 16)
        except BlockingIOError:
          continue
        if not data:
          sel.unregister(key.fileobj)
          continue
        if key.data is result:
          if len(result) < _RESULT_CAP:
            result += data[:_RESULT_CAP - len(result)]
          if bytes(result[:1]) == b'D' and nonce_w is not None:
            try:
              os.write(nonce_w, nonce)  # 64 bytes < PIPE_BUF: one atomic write
            except BrokenPipeError:
              pass
            os.close(nonce_w)
            nonce_w = None
        else:
          key.data.add(data)
  # Everything of the run dies: the session (unshare + harness = pid 1 of the namespace,
  # whose death kills the rest of the namespace); in root plain mode the run's uid too.
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  if mode == 'plain' and uid is not None:
    _kill_uid(uid)
  returncode = proc.wait()
  wall = time.monotonic() - start
  for f in (proc.stdin, proc.stdout, proc.stderr):
    if not f.closed:
      f.close()
  os.close(res_r)
  os.close(events_r)
  if nonce_w is not None:
    os.close(nonce_w)
  shutil.rmtree(workdir, ignore_errors=True)

  passed = (not timed_out and returncode == 0 and bytes(result) == b'D' + nonce)
  if passed:
    status = 'passed'
  elif timed_out:
    status = 'timeout'
  elif bytes(result[:1]) == b'R':
    status = 'rejected'
  elif bytes(result[:1]) == b'X':
    status = 'failed'
  elif returncode == 0:
    status = 'exited'
  elif returncode < 0 or returncode >= 128 or 'unshare: ' in err.text():
    status = 'killed'  # (unshare reports its child's fatal signal as rc 1 + a message)
  else:
    status = 'exited'
  reason = bytes(result[1:]).decode('utf-8', 'replace') if status == 'rejected' else ''
  return Result(passed, status, wall, out.text(), err.text(), returncode, reason,
                events.total, out.total > out.cap or err.total > err.cap)


def run_many(jobs: Sequence[tuple[str, str]], limits: Limits = Limits(),
             max_parallel: int = 0) -> list[Result]:
  """`run_tests` on each (program, tests) pair, `max_parallel` children at a time (0: one
  per CPU), results in order."""
  if not jobs:
    return []
  workers = max(1, min(max_parallel or os.cpu_count() or 1, len(jobs)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda job: run_tests(job[0], job[1], limits), jobs))
