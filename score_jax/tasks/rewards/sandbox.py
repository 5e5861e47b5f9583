"""Runs untrusted, model-written Python against unit tests, in a child process.

Only `run_tests`, `run_many` and `isolation_report` are public. A run is one fresh child:

  trainer --Popen(start_new_session)--> [unshare --net --pid --mount --mount-proc --fork]
      --> harness = `python -I -S -c _HARNESS` (pid 1 of a new pid namespace)
            trusted phase: read {program, tests} from stdin, stdin := /dev/null, mount
            size-capped tmpfs on every world-writable dir (/tmp, /var/tmp, /dev/shm,
            /run/lock) and make the work dir there, rlimits (CPU, address space, file
            size, processes, open files, no core), drop to a per-run unprivileged uid/gid
            (root only), no_new_privs, an audit hook (no sockets, no ctypes, no tracers).
            untrusted phase: exec(program); exec(tests) in one namespace.
            proof: see below; then os._exit.

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
(sys.exit(0), os._exit(0), SystemExit / KeyboardInterrupt / any BaseException in a test:
the harness catches BaseException and reports failure), printing a fake success line
(stdout is not the result pipe), searching memory or frames for the nonce during the tests
(it is not there yet), monkeypatching builtins / sys / os / the checker (the harness keeps
private references taken before candidate code runs; `assert` uses the real
AssertionError), forking a copy of the harness (only the original pid may answer, and a
second `D` spoils the exact match). Before reading the nonce the harness "seals" itself:
tracing/profiling off, gc off (no finalizers), all signals ignored, every other process of
the namespace SIGKILLed, and it refuses if another thread is alive. Not defended, by
design of a single-interpreter harness: candidate code written against this harness that
writes `D` to the result fd itself and echoes the nonce (the fds are findable); a C-level
memory writer (ctypes is blocked by the audit hook, but that hook is a second layer, not
a boundary); and test-semantic hacks such as returning an object whose __eq__ is always
True -- the sandbox proves the tests ran to the end, not that the tests are strong.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
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
  # 'passed'; 'failed' (a test or the program raised, incl. SystemExit); 'exited' (the
  # child ended without finishing the tests, e.g. os._exit(0)); 'killed' (a signal, e.g.
  # the CPU limit); 'timeout' (wall limit); 'error' (the sandbox itself failed to run).
  status: str
  wall_s: float
  stdout_tail: str
  stderr_tail: str
  returncode: int | None = None


# ---------------------------------------------------------------------------------------
# The harness: runs in the child as `python -I -S -c _HARNESS CONFIG_JSON`.

_HARNESS = r'''
import sys, os, json, gc, signal, resource, builtins, ctypes

def _main():
  cfg = json.loads(sys.argv[1])
  _read, _write, _close, _exit, _getpid, _kill = (
      os.read, os.write, os.close, os._exit, os.getpid, os.kill)
  _listdir, _exec, _compile = os.listdir, exec, compile
  _gc_disable = gc.disable
  _signal, _out, _err = signal.signal, sys.stdout, sys.stderr
  res_fd, nonce_fd = cfg['result_fd'], cfg['nonce_fd']
  for fd in (res_fd, nonce_fd):
    os.set_inheritable(fd, False)  # exec'd subprocesses of the candidate never get them

  chunks = []
  while True:
    b = _read(0, 1 << 20)
    if not b:
      break
    chunks.append(b)
  payload = json.loads(b''.join(chunks))
  devnull = os.open('/dev/null', os.O_RDONLY)
  os.dup2(devnull, 0)
  _close(devnull)

  libc = ctypes.CDLL(None, use_errno=True)

  def mount(source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
      raise OSError(ctypes.get_errno(), 'mount %s on %s' % (source, target))

  if cfg['mount_tmpfs']:
    # Only in our own mount namespace. World-writable dirs become empty, size-capped tmpfs.
    # A dir the run's uid cannot traverse on the way to the interpreter's stdlib (e.g.
    # /root, mode 0700) is hidden under a tmpfs, with just the stdlib bound back in.
    if cfg['expose']:
      hide, keep = cfg['expose']
      keep_fd = os.open(keep, os.O_PATH | os.O_DIRECTORY)
      mount('tmpfs', hide, 'tmpfs', 2 | 4, 'size=64k,mode=755')
      os.makedirs(keep, mode=0o755)
      mount('/proc/self/fd/%d' % keep_fd, keep, None, 4096 | 16384, None)  # MS_BIND|MS_REC
      _close(keep_fd)
    if cfg['readonly_root']:
      # userns: we act as the trainer's own uid, so every existing mount becomes read-only
      # (bind remount; deepest last so none is skipped) before the tmpfs dirs go on top.
      with open('/proc/self/mountinfo') as f:
        points = [line.split()[4] for line in f]
      for point in sorted(set(points), key=len):
        flags = 32 | 4096 | 1 | 2  # MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        if libc.mount(None, point.encode(), None, flags, None) != 0:
          pass  # e.g. a mount we may not touch; it stays as it was (report says so)
    for path, size in cfg['tmpfs']:
      if os.path.isdir(path):
        mount('tmpfs', path, 'tmpfs', 2 | 4, 'size=%dk,mode=1777' % size)  # NOSUID|NODEV
    os.makedirs(cfg['workdir'], exist_ok=True)
  if cfg['uid'] is not None:
    os.chown(cfg['workdir'], cfg['uid'], cfg['uid'])
  os.chmod(cfg['workdir'], 0o700)
  os.chdir(cfg['workdir'])

  cpu = cfg['cpu_s']
  for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, cfg['as_bytes']),
                      (resource.RLIMIT_FSIZE, cfg['fsize_bytes']),
                      (resource.RLIMIT_NPROC, cfg['nproc']), (resource.RLIMIT_CORE, 0),
                      (resource.RLIMIT_NOFILE, 256)):
    resource.setrlimit(what, (value, value))
  if cfg['uid'] is not None:
    os.setgroups([])
    os.setgid(cfg['uid'])
    os.setuid(cfg['uid'])
  libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot regain root.
  if cfg['readonly_root']:
    # Drop every capability we hold in our user namespace, so the code cannot remount.
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
      raise OSError(ctypes.get_errno(), 'capset')

  def hook(event, args, _exact=frozenset(('sys.settrace', 'sys.setprofile')),
           _prefixes=('socket.', 'ctypes.', '_ssl.'),
           _attrs=frozenset(('__code__', '__defaults__', '__kwdefaults__')),
           _fn=None, _code=None):
    # Any exception aborts the audited operation, so tampering with names this function
    # looks up still blocks; its own defaults and code cannot be replaced (audited below).
    if (event in _exact or event.startswith(_prefixes) or
        (event == 'object.__setattr__' and type(args[0]) is _fn and args[1] in _attrs and
         args[0].__code__ is _code)):
      raise RuntimeError('sandbox: ' + event + ' is not allowed')
  hook.__defaults__ = hook.__defaults__[:3] + (type(hook), hook.__code__)
  sys.addaudithook(hook)

  me = _getpid()
  ns = {'__name__': '__candidate__', '__builtins__': builtins}
  try:
    _exec(_compile(payload['program'], '<program>', 'exec'), ns)
    _exec(_compile(payload['tests'], '<tests>', 'exec'), ns)
  except BaseException:
    try:
      _out.flush()
    except BaseException:
      pass
    try:
      import traceback
      traceback.print_exc(file=sys.__stderr__)
      sys.__stderr__.flush()
    except BaseException as e:
      _write(2, ('sandbox: could not print the traceback: %r' % e).encode())
    _write(res_fd, b'X')  # informative only (status 'failed'); never a success
    _exit(1)

  # Seal: no candidate code may run from here on (see the module docstring). Tracers and
  # profilers cannot have been installed (the audit hook refuses them).
  _gc_disable()
  for s in range(1, signal.NSIG):
    try:
      _signal(s, signal.SIG_IGN)
    except (OSError, ValueError, RuntimeError):
      pass
  if _getpid() != me:
    _exit(3)   # a forked copy of the harness
  if me == 1:
    try:
      _kill(-1, 9)  # pid 1 of our namespace: every other process in it
    except ProcessLookupError:
      pass  # there was none
  try:
    if len(_listdir('/proc/self/task')) != 1:
      _exit(4)   # a candidate thread is still alive
  except OSError:
    _exit(4)
  for f in (_out, _err):
    try:
      f.flush()
    except BaseException:
      pass
  _write(res_fd, b'D')
  nonce = _read(nonce_fd, 64)
  _write(res_fd, nonce)
  _exit(0)

_main()
'''


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


def isolation_report() -> str:
  """What isolation is actually in force for runs on this machine, in words."""
  mode = _isolation()
  common = ('own session/process group, SIGKILL of the session at the wall limit; rlimits '
            'CPU, address space, file size, processes, open files, no core; env only '
            'PATH/LANG/HOME/TMPDIR; `python -I -S`; stdin=/dev/null; output tails capped; '
            'audit hook blocks socket/ctypes/settrace (second layer only); nonce proof')
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
    self.cap, self.buf = cap, bytearray()

  def add(self, data: bytes):
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
  """Runs `program` then `tests` in one namespace in a fresh sandboxed child process.

  `passed` is True only when the harness proved that the tests returned normally; every
  other outcome (assertion, exception, early exit, signal, timeout) is passed=False.
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
  cfg = dict(result_fd=res_w, nonce_fd=nonce_r, workdir=workdir, uid=uid,
             mount_tmpfs=mode != 'plain', readonly_root=mode == 'userns',
             expose=_stdlib_exposure() if mode == 'root-namespaces' else None,
             tmpfs=[('/tmp', limits.file_size_mb * 4096), ('/var/tmp', 1024),
                    ('/dev/shm', 1024), ('/run/lock', 64)],
             cpu_s=max(1, int(round(limits.cpu_s))), as_bytes=limits.memory_mb << 20,
             fsize_bytes=limits.file_size_mb << 20, nproc=limits.max_processes)
  env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': workdir, 'TMPDIR': workdir}
  out, err, result = _Tail(limits.output_bytes), _Tail(limits.output_bytes), bytearray()
  start = time.monotonic()
  try:
    proc = subprocess.Popen(_child_command(mode, cfg), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(res_w, nonce_r), start_new_session=True, env=env,
                            cwd=workdir)
  except OSError as e:
    for fd in (res_r, res_w, nonce_r, nonce_w):
      os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    return Result(False, 'error', 0.0, '', f'sandbox could not start: {e}')
  os.close(res_w)
  os.close(nonce_r)
  payload = json.dumps({'program': program, 'tests': tests}).encode()
  timed_out = False
  with selectors.DefaultSelector() as sel:
    for f in (proc.stdin, proc.stdout, proc.stderr):
      os.set_blocking(f.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE, 'in')
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    sel.register(res_r, selectors.EVENT_READ, result)
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
  if nonce_w is not None:
    os.close(nonce_w)
  shutil.rmtree(workdir, ignore_errors=True)

  passed = (not timed_out and returncode == 0 and bytes(result) == b'D' + nonce)
  if passed:
    status = 'passed'
  elif timed_out:
    status = 'timeout'
  elif bytes(result[:1]) == b'X':
    status = 'failed'
  elif returncode == 0:
    status = 'exited'
  elif returncode < 0 or returncode >= 128 or 'unshare: ' in err.text():
    status = 'killed'  # (unshare reports its child's fatal signal as rc 1 + a message)
  else:
    status = 'exited'
  return Result(passed, status, wall, out.text(), err.text(), returncode)


def run_many(jobs: Sequence[tuple[str, str]], limits: Limits = Limits(),
             max_parallel: int = 0) -> list[Result]:
  """`run_tests` on each (program, tests) pair, `max_parallel` children at a time (0: one
  per CPU), results in order."""
  if not jobs:
    return []
  workers = max(1, min(max_parallel or os.cpu_count() or 1, len(jobs)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda job: run_tests(job[0], job[1], limits), jobs))
