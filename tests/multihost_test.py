"""Two processes with jax.distributed on this machine: the real pipeline, a process killed
in Stage II, the resume, and the same numbers as one process.

Process-local batches (hosts.py): each of 2 processes (4 forced CPU devices each, gloo
collectives, one global mesh of 8) samples and scores its half of the RLOO groups and
feeds its rows of the loss batch. The run must give what a 1-process, 8-device run of the
same config gives, also after one of its processes was killed in Stage II and both were
started again.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from e2e_test import _metrics  # metrics.jsonl rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny model on one-digit sums: 60 base steps make it right on some sampled attempts, so
# Stage II has non-zero advantages and moves the params.
TINY = [
    "--config=configs/demo.py",
    "--config.model.embed_dim=32", "--config.model.hidden_dim=64", "--config.model.num_layers=1",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
    "--config.tokenizer.corpus_size=300", "--config.task.num_digits=1",
    "--config.task.eval_fraction=0.5",
    "--config.phases.base.steps=60", "--config.phases.base.batch_size=16",
    "--config.phases.base.warmup_steps=5",
    "--config.rl.num_prompts=4", "--config.rl.samples_per_prompt=2",
    "--config.phases.stage1.steps=3", "--config.phases.stage2.steps=8",
    "--config.eval.num_problems=24", "--config.eval.batch_size=8", "--config.eval.num_transcripts=5",
    "--config.checkpoint.every=4", "--config.log_every=1",
]
# Wall-clock timing and the step counter's ETA differ between runs; everything else must not.
TIMING = {"time", "step_time", "tokens_per_s", "sample_time", "score_time", "train_time",
          "sample_tokens_per_s"}
# How long the surviving process may take to notice that its peer died and exit: the
# heartbeat timeout passed to jax.distributed (10 s) plus its reporting.
DEATH_NOTICED_S = 60


def _env(devices: int):
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two(workdir, logs):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "score_jax.main", f"--workdir={workdir}", *TINY, "--distributed",
       f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       "--heartbeat_timeout=10"], cwd=REPO, env=_env(4), stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(2)]


def _params(workdir, phase, step):
  """A saved params item as {path: NumPy array}, read by Orbax alone (no mesh needed)."""
  path = os.path.join(workdir, phase, str(step), "params")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _read(path):
  with open(path) as f:
    return f.read()


def test_two_processes_killed_resumed_equal_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", "score_jax.main", f"--workdir={one}", *TINY],
                       cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=900)
  one_s = time.time() - t0
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

  # Two processes until Stage II is past its step-4 checkpoint; then process 1 dies.
  logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
  t0 = time.time()
  procs = _start_two(two, logs)
  deadline = time.time() + 900
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if any(m["phase"] == "stage2" and m["step"] >= 5 for m in _metrics(two)):
      break
    time.sleep(0.1)
  assert all(p.poll() is None for p in procs), _read(tmp_path / "p0.log")[-3000:]
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  try:
    procs[0].wait(timeout=DEATH_NOTICED_S)
  finally:
    procs[0].kill()
  noticed_s = time.time() - killed
  for f in logs:
    f.close()
  log0 = _read(tmp_path / "p0.log")
  assert procs[0].returncode != 0, log0[-3000:]
  # It says why: JAX's coordination service saw the peer's heartbeats stop (measured
  # here), or a collective lost its peer first.
  assert ("This most likely indicates that another task died" in log0
          or "Connection closed by peer" in log0), log0[-3000:]
  killed_at = max(m["step"] for m in _metrics(two) if m["phase"] == "stage2")
  assert 5 <= killed_at < 8

  # Both again, with the same command: resume from stage2/4 and finish.
  logs = [open(tmp_path / f"r{i}.log", "w") for i in range(2)]
  t1 = time.time()
  procs = _start_two(two, logs)
  for p in procs:
    p.wait(timeout=900)
  two_resume_s = time.time() - t1
  two_s = killed - t0 + two_resume_s
  for f in logs:
    f.close()
  log = _read(tmp_path / "r0.log")
  assert all(p.returncode == 0 for p in procs), log[-3000:] + _read(tmp_path / "r1.log")[-3000:]
  assert "[stage2] resuming from" in log and "/stage2/4" in log
  assert "[base] step" not in log and "[stage1] step" not in log  # finished phases stay done

  # Each step once, with the same numbers as the 1-process run.
  rows_one, rows_two = _metrics(one), _metrics(two)
  key = lambda m: (m["phase"], m["step"])
  assert [key(m) for m in rows_two] == [key(m) for m in rows_one]
  assert [key(m) for m in rows_one if m["phase"] == "stage2"] == [("stage2", s) for s in range(1, 9)]
  for a, b in zip(rows_one, rows_two):
    assert set(a) == set(b)
    for k in set(a) - TIMING - {"phase", "step"}:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=f"{key(a)} {k}")
  # Stage II learned something (the comparison below is not of untouched weights).
  assert any(abs(m["loss"]) > 1e-3 for m in rows_one if m["phase"] == "stage2")

  final_one, final_two = _params(one, "stage2", 8), _params(two, "stage2", 8)
  base = _params(one, "base", 60)
  assert final_one.keys() == final_two.keys()
  # Stage II moves the weights by ~1e-4 here; the two runs agree far closer than that.
  assert max(np.abs(final_one[k] - base[k]).max() for k in base) > 2e-5
  for k in final_one:
    np.testing.assert_allclose(final_two[k], final_one[k], rtol=1e-5, atol=1e-6, err_msg=k)

  for phase in ("base", "stage1", "stage2"):  # Evaluation split over the processes.
    a = json.loads(_read(os.path.join(one, "eval", f"{phase}.json")))
    b = json.loads(_read(os.path.join(two, "eval", f"{phase}.json")))
    for k, v in a.items():
      if isinstance(v, float):
        np.testing.assert_allclose(b[k], v, atol=1e-6, err_msg=f"{phase} {k}")
      else:
        assert b[k] == v, (phase, k)
    assert _read(os.path.join(two, "eval", f"transcripts_{phase}.jsonl")) == _read(
        os.path.join(one, "eval", f"transcripts_{phase}.jsonl"))
  print(f"\n1 process x 8 devices: {one_s:.0f} s; 2 processes x 4 devices: {two_s:.0f} s "
        f"(killed run {killed - t0:.0f} s + resumed run {two_resume_s:.0f} s); the survivor "
        f"exited {noticed_s:.1f} s after its peer was killed")
