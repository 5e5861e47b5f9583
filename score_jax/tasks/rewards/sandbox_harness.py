"""The harness inside a sandbox child: `python -I -S -c <this file's text> CONFIG_JSON`.

`sandbox.py` sends this file's text; the trainer never imports it (it would do nothing).
The child reads {program, tests, names, imports} from stdin and runs in three phases:

  trusted    stdin := /dev/null; mounts, rlimits, the per-run uid, no_new_privs, not
             dumpable (no /proc/self/mem); a seccomp filter: no signal handlers (a
             handler gets the interrupted frame, a way up to the tests and the harness)
             and no threads (one could patch state while the tests run); snapshots of
             what the tests use; then the audit hook.
  candidate  exec(program) in its own namespace. The tests run in ANOTHER namespace with a
             private copy of the builtins and private copies of the modules they import;
             the program's names they use (`names`, from `sandbox.test_plan`) are bound
             there wrapped, so every value a call returns is checked: made of exact
             builtin types, recursively (bool, int, float, complex, str, bytes, None,
             list, tuple, dict, set, frozenset; no subclasses). Before the tests and after
             each call, the builtins and the imported modules and their classes must be
             as they were. A failed check writes `R` + the reason to the result pipe and
             exits at once (nothing can un-write it).
  seal       no candidate code can run any more: `D`, the parent's nonce, echoed, exit 0.

Everything the checks use is bound before candidate code runs, as default arguments or
arguments (never looked up later by name), and the harness module is unimportable, so
patching builtins, `type`, `isinstance` or harness functions changes nothing; exact types
are compared by `type(x) is T` with the captured `type`, never `isinstance` (which
`__instancecheck__` and `__class__` answer). The audit hook refuses what would reach the
harness's or the tests' state: frames (`sys._getframe`, `tb_frame`, `gi_frame`, ...),
`gc` referrers/objects, new audit hooks, tracing, changing the harness's functions,
sockets, ctypes; each refusal writes `A` to the events pipe, which the parent counts.
"""
import builtins
import collections
import ctypes
import gc
import itertools
import json
import operator
import os
import resource
import signal
import struct
import sys
import types

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_SEQUENCES = (list, tuple, set, frozenset)
# A top-level result of these stdlib classes is compared as the plain dict of its items
# (MBPP references return a Counter where the test writes a dict literal).
_MAPPINGS = (collections.Counter, collections.OrderedDict, collections.defaultdict)
# seccomp: machine -> (AUDIT_ARCH, rt_sigaction, clone, clone3)
_SECCOMP_ARCH = {'x86_64': (0xC000003E, 13, 56, 435), 'aarch64': (0xC00000B7, 134, 220, 435)}
_REFUSED_EVENTS = frozenset((
    'sys.settrace', 'sys.setprofile', 'sys.addaudithook', 'sys._current_frames',
    'sys._current_exceptions', 'gc.get_objects', 'gc.get_referrers', 'gc.get_referents'))


def _read_payload() -> dict:
  chunks = []
  while True:
    b = os.read(0, 1 << 20)
    if not b:
      break
    chunks.append(b)
  devnull = os.open('/dev/null', os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  return json.loads(b''.join(chunks))


def _mount_workdir(cfg: dict, libc) -> None:
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
      os.close(keep_fd)
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


def _limit_and_drop(cfg: dict, libc) -> None:
  for what, value in ((resource.RLIMIT_CPU, cfg['cpu_s']),
                      (resource.RLIMIT_AS, cfg['as_bytes']),
                      (resource.RLIMIT_FSIZE, cfg['fsize_bytes']),
                      (resource.RLIMIT_NPROC, cfg['nproc']), (resource.RLIMIT_CORE, 0),
                      (resource.RLIMIT_NOFILE, 256)):
    resource.setrlimit(what, (value, value))
  if cfg['uid'] is not None:
    os.setgroups([])
    os.setgid(cfg['uid'])
    os.setuid(cfg['uid'])
  libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot regain root.
  libc.prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0: /proc/self/mem & co. become root's.
  if cfg['readonly_root']:
    # Drop every capability we hold in our user namespace, so the code cannot remount.
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
      raise OSError(ctypes.get_errno(), 'capset')


def _seccomp(libc) -> None:
  """Kernel filter for this process and its children: rt_sigaction fails (EPERM), clone
  with CLONE_THREAD fails (EAGAIN), clone3 is ENOSYS (glibc then uses clone). Forks and
  subprocesses still work. Nothing on other machines (isolation_report says so)."""
  arch = _SECCOMP_ARCH.get(os.uname().machine)
  if arch is None:
    return
  audit_arch, nr_sigaction, nr_clone, nr_clone3 = arch
  ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
  allow, errno = 0x7fff0000, 0x00050000
  ins = lambda code, jt, jf, k: struct.pack('HBBI', code, jt, jf, k)
  prog = b''.join([
      ins(ld, 0, 0, 4), ins(jeq, 1, 0, audit_arch), ins(ret, 0, 0, allow),  # other ABI
      ins(ld, 0, 0, 0),                                                       # syscall nr
      ins(jeq, 0, 1, nr_sigaction), ins(ret, 0, 0, errno | 1),
      ins(jeq, 0, 1, nr_clone3), ins(ret, 0, 0, errno | 38),
      ins(jeq, 1, 0, nr_clone), ins(ret, 0, 0, allow),
      ins(ld, 0, 0, 16), ins(jset, 0, 1, 0x10000), ins(ret, 0, 0, errno | 11),  # flags
      ins(ret, 0, 0, allow)])
  buf = ctypes.create_string_buffer(prog)
  fprog = (ctypes.c_ulong * 2)(len(prog) // 8, ctypes.addressof(buf))  # sock_fprog
  if libc.prctl(22, 2, fprog, 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), 'seccomp filter refused')


def _snapshot(imports: list) -> tuple[tuple, dict]:
  """(watched, copies): for the builtins, each module the tests import and its mutable
  classes, (dict, label, keys, values) as they are now; and a private copy of each module
  for the tests' own imports. Names added later are allowed (lazy submodules, caches);
  a name rebound or deleted is a patch."""
  watched = [(builtins.__dict__, b'builtins')]
  copies = {}
  for name in imports:
    try:
      __import__(name)
    except Exception:  # pylint: disable=broad-except
      continue  # the tests' own import fails later, as it would without the sandbox
    module = sys.modules[name]
    copies[name] = types.ModuleType(name)
    copies[name].__dict__.update(module.__dict__)
    watched.append((module.__dict__, name.encode()))
    for value in list(module.__dict__.values()):
      if (isinstance(value, type) and value.__flags__ & (1 << 9)       # heap type,
          and not value.__flags__ & (1 << 8) and value.__module__ == name):  # mutable
        real_dict = gc.get_referents(value.__dict__)[0]  # behind the mappingproxy
        watched.append((real_dict, ('%s.%s' % (name, value.__name__)).encode()))
  return tuple((d, label, tuple(d), tuple(d.values())) for d, label in watched), copies


def _importer(copies: dict, real_import):
  """`__import__` of the tests: their modules are the private copies."""
  def import_(name, globals=None, locals=None, fromlist=(), level=0, _copies=copies,
              _import=real_import):
    key = name if fromlist else name.partition('.')[0]
    if not level and key in _copies:
      return _copies[key]
    return _import(name, globals, locals, fromlist, level)
  return import_


def _rejecter(res_fd: int):
  def reject(reason: bytes, _write=os.write, _exit=os._exit, _fd=res_fd,
             _BaseException=BaseException):
    try:
      _write(2, b'\nsandbox: rejected: ' + reason + b'\n')
      _write(_fd, b'R' + reason[:200])
    except _BaseException:
      pass  # a closed fd: the run cannot pass either way
    _exit(1)
  return reject


def _checker(watched: tuple, reject):
  """`check(value, name) -> value`, or the run ends rejected (see the module doc)."""
  def check(value, name, _type=type, _id=id, _len=len, _all=all, _map=map, _is=operator.is_,
            _repeat=itertools.repeat, _missing=object(), _watched=watched,
            _scalars=frozenset(map(id, _SCALARS)), _sequences=frozenset(map(id, _SEQUENCES)),
            _dict=dict, _dict_id=id(dict), _keys=dict.keys, _values=dict.values,
            _items=dict.items, _mappings=frozenset(map(id, _MAPPINGS)), _reject=reject,
            _type_name=type.__dict__['__name__'].__get__, _encode=str.encode):
    for mapping, label, keys, values in _watched:
      if not _all(_map(_is, _map(mapping.get, keys, _repeat(_missing)), values)):
        _reject(b'patched ' + label + b' (seen after ' + name + b')')
    top, stack, seen = _id(_type(value)), [value], set()
    while stack:
      item = stack.pop()
      kind = _id(_type(item))
      if kind in _scalars:
        continue
      if kind in _sequences or kind == _dict_id or (item is value and kind in _mappings):
        if _id(item) not in seen:
          seen.add(_id(item))
          if kind in _sequences:
            stack.extend(item)
          else:
            stack.extend(_keys(item))
            stack.extend(_values(item))
        continue
      _reject(b'result of ' + name + b'() holds a ' +
              _encode(_type_name(_type(item)), 'utf-8', 'replace')[:60] +
              b', not only builtin values')
    return _dict(_items(value)) if top in _mappings else value
  return check


def _guarded_call(state, *args, **kwargs):
  """What the tests call for a program function (a MethodType bound to `state`, so
  neither the function nor its check can be swapped)."""
  fn, check, name = state
  return check(fn(*args, **kwargs), name)


def _test_namespace(program_ns: dict, names: list, test_builtins: dict, check,
                    _method=types.MethodType, _callable=callable, _call=_guarded_call) -> dict:
  """Runs after the program: everything it uses is a default argument."""
  ns = {'__name__': '__tests__', '__builtins__': test_builtins}
  for name, raw in names:
    if name in program_ns:  # else the tests raise NameError, as without the sandbox
      obj = program_ns[name]
      label = name.encode()
      if raw:  # only called to build arguments of program calls (`Pair` in MBPP)
        ns[name] = obj
      elif _callable(obj):
        ns[name] = _method(_call, (obj, check, label))
      else:
        ns[name] = check(obj, label)
  return ns


def _audit_hook(events_fd: int, phase: list, protected: tuple):
  """The hook; it refuses to change the code or defaults of the `protected` functions
  (the harness's own: other functions may, as `namedtuple` does)."""
  protected_ids = set(map(id, protected))

  def hook(event, args, _phase=phase, _write=os.write, _fd=events_fd, _id=id, _type=type,
           _protected=protected_ids, _refused=_REFUSED_EVENTS,
           _prefixes=('socket.', 'ctypes.', '_ssl.'),
           _setattr=frozenset(('object.__setattr__', 'object.__delattr__')),
           _frames=frozenset(('tb_frame', 'gi_frame', 'cr_frame', 'ag_frame')),
           _function_attrs=frozenset(('__code__', '__defaults__', '__kwdefaults__')),
           _memory=frozenset(('mem', b'mem')), _opens=frozenset(('open', 'os.symlink')),
           _str=str, _bytes=bytes,
           _tail=lambda p, _slash={str: '/', bytes: b'/'}: p.rpartition(_slash[p.__class__])[2],
           _ValueError=ValueError, _RuntimeError=RuntimeError, _OSError=OSError):
    # Any exception aborts the audited operation. Only defaults are used: nothing this
    # function looks up can have been replaced.
    if not _phase[0]:
      return
    if event == 'sys._getframe':
      raise _ValueError('call stack is not deep enough')  # what typing & co. catch
    if not (event in _refused or event.startswith(_prefixes)
            or (event == 'object.__getattr__' and args[1] in _frames)
            # /proc/<pid>/mem holds the tests: where not dumpable is not enough (userns)
            or (event in _opens and _type(args[0]) in (_str, _bytes)
                and _tail(args[0]) in _memory)
            or (event in _setattr and _id(args[0]) in _protected
                and args[1] in _function_attrs)):
      return
    try:
      _write(_fd, b'A')
    except _OSError:
      pass
    raise _RuntimeError('sandbox: ' + event + ' is not allowed')
  protected_ids.add(id(hook))
  return hook


def _candidate_then_seal(program, tests, names, test_builtins, check, phase, res_fd,
                         nonce_fd, _exec=exec, _compile=compile, _write=os.write,
                         _read=os.read, _exit=os._exit, _getpid=os.getpid, _kill=os.kill,
                         _listdir=os.listdir, _gc_disable=gc.disable, _signal=signal.signal,
                         _out=sys.stdout, _err=sys.stderr, _builtins=builtins,
                         _test_namespace=_test_namespace, _range=range, _len=len,
                         _nsig=signal.NSIG, _ignore=signal.SIG_IGN,
                         _BaseException=BaseException, _OSError=OSError):
  """Runs candidate code, then proves the tests returned. Uses only its arguments."""
  me = _getpid()
  program_ns = {'__name__': '__candidate__', '__builtins__': _builtins}
  try:
    _exec(_compile(program, '<program>', 'exec'), program_ns)
    check(None, b'the program')
    _exec(_compile(tests, '<tests>', 'exec'),
          _test_namespace(program_ns, names, test_builtins, check))
    check(None, b'the tests')
  except _BaseException:
    _write(res_fd, b'X')  # informative only (status 'failed'); never a success
    phase[0] = False      # the run is lost: tracebacks may read frames now
    try:
      _out.flush()
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exc(file=sys.__stderr__)
      sys.__stderr__.flush()
    except _BaseException as e:
      _write(2, ('sandbox: could not print the traceback: %r' % e).encode())
    _exit(1)

  # Seal: no candidate code may run from here on. Tracers, threads and signal handlers
  # cannot exist (audit hook, seccomp); gc off (no finalizers); signals ignored where
  # seccomp is unavailable; every other process of the namespace SIGKILLed.
  _gc_disable()
  for s in _range(1, _nsig):
    try:
      _signal(s, _ignore)
    except _BaseException:
      pass
  if _getpid() != me:
    _exit(3)   # a forked copy of the harness
  if me == 1:
    try:
      _kill(-1, 9)  # pid 1 of our namespace: every other process in it
    except _OSError:
      pass  # there was none
  try:
    if _len(_listdir('/proc/self/task')) != 1:
      _exit(4)   # a candidate thread is still alive
  except _OSError:
    _exit(4)
  for f in (_out, _err):
    try:
      f.flush()
    except _BaseException:
      pass
  _write(res_fd, b'D')
  nonce = _read(nonce_fd, 64)
  _write(res_fd, nonce)
  _exit(0)


def main():
  cfg = json.loads(sys.argv[1])
  del sys.modules['__main__']  # the candidate cannot `import __main__` to reach the harness
  for fd in (cfg['result_fd'], cfg['nonce_fd'], cfg['events_fd']):
    os.set_inheritable(fd, False)  # exec'd subprocesses of the candidate never get them
  payload = _read_payload()
  libc = ctypes.CDLL(None, use_errno=True)
  _mount_workdir(cfg, libc)
  _limit_and_drop(cfg, libc)
  _seccomp(libc)
  watched, copies = _snapshot(payload['imports'])
  test_builtins = dict(builtins.__dict__, __import__=_importer(copies, builtins.__import__))
  reject = _rejecter(cfg['result_fd'])
  check = _checker(watched, reject)
  importer = test_builtins['__import__']
  phase = [True]
  sys.addaudithook(_audit_hook(cfg['events_fd'], phase, (
      check, reject, importer, _guarded_call, _test_namespace, _candidate_then_seal)))
  _candidate_then_seal(payload['program'], payload['tests'], payload['names'],
                       test_builtins, check, phase, cfg['result_fd'], cfg['nonce_fd'])


if __name__ == '__main__':
  main()
