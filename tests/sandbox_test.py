"""The sandbox against hostile programs: each must get passed=False and change nothing.

Every hostile program defines a WRONG `f` (f(2) == 5) and then attacks; the tests are
`assert f(2) == 4`, so any reward would be a successful hack. Small limits keep it fast.
"""
import os
import secrets
import select
import socket
import time
from pathlib import Path

import pytest

from score_jax.tasks.rewards import sandbox as sb

FAST = sb.Limits(cpu_s=1.0, wall_s=2.0, memory_mb=256, max_processes=16,
                 output_bytes=4_000)
WRONG = 'def f(x):\n  return x + 3\n'
TESTS = 'assert f(2) == 4\n'


def run_hostile(attack: str, tests: str = TESTS, limits: sb.Limits = FAST) -> sb.Result:
  result = sb.run_tests(WRONG + attack, tests, limits)
  assert not result.passed, (result.status, result.stdout_tail, result.stderr_tail)
  return result


def host_processes_with(marker: str) -> list[int]:
  """Host pids whose command line contains `marker` (reads /proc of the test process)."""
  pids = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/cmdline', 'rb') as f:
          if marker.encode() in f.read():
            pids.append(int(entry))
      except OSError:
        pass
  return pids


# -- correct and wrong programs ------------------------------------------------------------


def test_correct_program_passes_and_wrong_one_fails():
  ok = sb.run_tests('def f(x):\n  return x + 2\n', TESTS, FAST)
  assert ok.passed and ok.status == 'passed', (ok.status, ok.stderr_tail)
  bad = sb.run_tests(WRONG, TESTS, FAST)
  assert not bad.passed and bad.status == 'failed'
  assert 'AssertionError' in bad.stderr_tail


def test_humaneval_style_check_and_stdlib_and_files_in_cwd():
  program = ('import heapq, collections, re, math\n'
             'def top(xs, k):\n'
             '  open("scratch.txt", "w").write(repr(xs))\n'
             '  return heapq.nlargest(k, xs)\n')
  tests = ('def check(candidate):\n'
           '  assert candidate([3, 1, 4, 1, 5], 2) == [5, 4]\n'
           '  assert open("scratch.txt").read() == "[3, 1, 4, 1, 5]"\n'
           'check(top)\n')
  result = sb.run_tests(program, tests, FAST)
  assert result.passed, result.stderr_tail


def test_run_many_keeps_order():
  jobs = [(f'def f(x):\n  return x + {k}\n', TESTS) for k in (2, 3, 2, 0)]
  assert [r.passed for r in sb.run_many(jobs, FAST, max_parallel=2)] == [
      True, False, True, False]


# -- resource attacks ----------------------------------------------------------------------


def test_fork_bomb():
  marker = 'forkbomb_' + secrets.token_hex(4)
  run_hostile(f'import os\nMARK = {marker!r}\nwhile True:\n  os.fork()\n')
  assert host_processes_with(marker) == []


def test_memory_bomb():
  result = run_hostile('x = bytearray(2 ** 33)\n')
  assert 'MemoryError' in result.stderr_tail


def test_infinite_loop_times_out():
  start = time.monotonic()
  result = run_hostile('while True:\n  pass\n')
  assert result.status in ('timeout', 'killed')
  assert time.monotonic() - start < FAST.wall_s + 1.5


def test_loop_ignoring_sigterm_still_dies():
  start = time.monotonic()
  run_hostile('import signal, time\n'
              'for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n'
              '  signal.signal(s, signal.SIG_IGN)\n'
              'while True:\n  time.sleep(0.01)\n')
  assert time.monotonic() - start < FAST.wall_s + 1.5


def test_setsid_orphan_is_dead_after_return():
  marker = 'orphan_' + secrets.token_hex(4)
  result = run_hostile(
      'import os, sys\n'
      'if os.fork() == 0:\n'
      '  os.setsid()\n'
      '  if os.fork() == 0:\n'
      f'    os.execv(sys.executable, [sys.executable, "-c", "import time\\nwhile 1: time.sleep(0.05)", {marker!r}])\n'
      '  os._exit(0)\n')
  assert result.wall_s < FAST.wall_s + 1
  if sb._isolation() == 'plain' and os.geteuid() != 0:
    pytest.skip('plain mode without root cannot kill setsid orphans (isolation_report says so)')
  time.sleep(0.2)
  assert host_processes_with(marker) == []


def test_output_flood_is_capped_and_drained():
  start = time.monotonic()
  result = run_hostile('import sys\n'
                       'for _ in range(400):\n'
                       '  sys.stdout.write("o" * 100_000)\n'
                       '  sys.stderr.write("e" * 100_000)\n')
  assert len(result.stdout_tail) <= FAST.output_bytes
  assert len(result.stderr_tail) <= FAST.output_bytes
  assert time.monotonic() - start < FAST.wall_s + 1.5


# -- escaping the sandbox ------------------------------------------------------------------


def test_writes_outside_the_work_dir_change_nothing(tmp_path):
  sentinel = tmp_path / 'sentinel.txt'
  sentinel.write_text('original')
  tag = secrets.token_hex(4)
  targets = [str(sentinel), str(tmp_path / f'new_{tag}'), str(Path.home() / f'.sbx_{tag}'),
             f'/tmp/sbx_escape_{tag}', f'/var/tmp/sbx_escape_{tag}',
             f'/dev/shm/sbx_escape_{tag}', os.path.abspath(f'sbx_escape_{tag}')]
  before = sorted(os.listdir(tmp_path))
  attack = (f'import os\nTARGETS = {targets!r}\nok = 0\n'
            'for t in TARGETS:\n'
            '  try:\n'
            '    open(t, "w").write("pwned")\n'
            '    ok += 1\n'
            '  except OSError:\n'
            '    pass\n'
            'try:\n'
            '  os.remove(TARGETS[0])\n'
            'except OSError:\n'
            '  pass\n')
  run_hostile(attack)
  assert sentinel.read_text() == 'original'
  assert sorted(os.listdir(tmp_path)) == before
  for t in targets[1:]:
    assert not os.path.exists(t), t


def test_environment_secrets_are_not_visible(monkeypatch):
  secret = 'sekrit_' + secrets.token_hex(8)
  monkeypatch.setenv('SCORE_TEST_SECRET', secret)
  result = run_hostile(
      'import os\n'
      'print(dict(os.environ))\n'
      f'for pid in ({os.getpid()}, os.getppid(), 1):\n'
      '  try:\n'
      '    print(open(f"/proc/{pid}/environ", "rb").read())\n'
      '  except OSError as e:\n'
      '    print(e)\n',
      tests=TESTS + 'assert "SCORE_TEST_SECRET" in os.environ\n')
  assert secret not in result.stdout_tail + result.stderr_tail
  assert 'SCORE_TEST_SECRET' not in result.stdout_tail


@pytest.mark.skipif(sb._isolation() == 'plain',
                    reason='no network namespace here (isolation_report says so)')
def test_network_connect_never_arrives():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(('127.0.0.1', 0))
    server.listen(8)
    port = server.getsockname()[1]
    connect = ('import socket\ns = socket.create_connection(("127.0.0.1", %d), timeout=1)\n'
               's.sendall(b"leak")\n' % port)
    # Directly (the audit hook refuses) and from a fresh interpreter without the hook
    # (only the network namespace stops that one).
    run_hostile(connect)
    run_hostile('import subprocess, sys\n'
                f'subprocess.run([sys.executable, "-I", "-S", "-c", {connect!r}], timeout=1.5)\n')
    readable, _, _ = select.select([server], [], [], 0.2)
    assert readable == [], 'a sandboxed program connected to the host'


def test_killing_the_parent_does_nothing():
  pid = os.getpid()
  run_hostile('import os, signal\n'
              f'for target in (os.getppid(), {pid}, -1, 0):\n'
              '  try:\n'
              '    os.kill(target, signal.SIGKILL)\n'
              '  except OSError:\n'
              '    pass\n'
              'for g in (os.getpgid(0), os.getpgid(os.getppid()) if os.getppid() else 0):\n'
              '  try:\n'
              '    os.killpg(g, signal.SIGKILL)\n'
              '  except OSError:\n'
              '    pass\n')
  assert os.getpid() == pid  # still here


# -- faking success ------------------------------------------------------------------------


@pytest.mark.parametrize('attack', [
    'import sys\nsys.exit(0)\n',
    'import os\nos._exit(0)\n',
    'raise SystemExit(0)\n',
    'def f(x):\n  raise SystemExit(0)\n',           # inside the test
    'def f(x):\n  raise KeyboardInterrupt\n',
    'class Stop(BaseException):\n  pass\ndef f(x):\n  raise Stop()\n',
    'import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n',
])
def test_early_exit_earns_nothing(attack):
  run_hostile(attack)


@pytest.mark.parametrize('attack', [
    # Assertions that cannot raise.
    'import builtins\nclass AssertionError(Exception):\n  pass\n'
    'builtins.AssertionError = type("Never", (Exception,), {})\n',
    # Break class creation, exit, and the functions the harness writes with.
    'import builtins, sys, os\nbuiltins.__build_class__ = lambda *a, **k: None\n'
    'sys.exit = lambda *a: None\nos._exit = lambda *a: None\nos.write = lambda *a: 65\n'
    'os.read = lambda *a: b"0" * 64\nbuiltins.exec = lambda *a, **k: None\n'
    'builtins.compile = lambda *a, **k: compile("pass", "x", "exec")\n',
    # Patch the checker after the tests' `def check` by hooking the namespace dict.
    'import sys\nsys.modules["builtins"].__dict__["check"] = lambda c: None\n',
    # Turn off assertions through the excepthook / tracing.
    'import sys\nsys.excepthook = lambda *a: None\n'
    'try:\n  sys.settrace(lambda *a: None)\nexcept RuntimeError:\n  pass\n',
])
def test_monkeypatching_earns_nothing(attack):
  run_hostile(attack)


def test_fake_success_lines_and_fd_writes_earn_nothing():
  run_hostile('import os, sys, gc, re\n'
              'print("passed"); print("PASSED " + "0" * 64)\n'
              'found = set()\n'
              'for o in gc.get_objects():\n'
              '  for v in (o.values() if isinstance(o, dict) else ()):\n'
              '    if isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v):\n'
              '      found.add(v)\n'
              'for fd in range(3, 64):\n'
              '  for token in ["D"] + sorted(found):\n'
              '    try:\n'
              '      os.write(fd, token.encode())\n'
              '    except OSError:\n'
              '      pass\n'
              'sys.stdout.flush()\n'
              'os._exit(0)\n')


def test_isolation_report_names_the_mode():
  report = sb.isolation_report()
  assert report.split(':')[0] == sb._isolation()
  if os.geteuid() == 0 and sb._isolation() == 'root-namespaces':
    assert 'network namespace' in report and 'pid' in report
