"""The real pipeline on a tiny config: tokenizer, base, Stage I, Stage II, eval, resume.

Runs `python -m score_jax.main` as a user would (a subprocess), kills it with SIGKILL in
the middle of Stage II, starts it again with the same command and checks that it resumes
from its last checkpoint and finishes with the report.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from score_jax import config_defaults
from score_jax import writers
from score_jax.recipes import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.embed_dim=32", "--config.model.hidden_dim=64", "--config.model.num_layers=1",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
    "--config.tokenizer.corpus_size=300",
    "--config.phases.base.steps=20", "--config.phases.base.batch_size=16",
    "--config.rl.num_prompts=4", "--config.rl.samples_per_prompt=2",
    "--config.phases.stage1.steps=3", "--config.phases.stage2.steps=12",
    "--config.eval.num_problems=24", "--config.eval.batch_size=8", "--config.eval.num_transcripts=5",
    "--config.checkpoint.every=2", "--config.log_every=1",
]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "score_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", *TINY, *extra]


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _metrics(workdir):
  return writers.read_rows(str(workdir))


def test_pipeline_kill_resume_and_eval(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 900  # breaks as soon as Stage II is at step 5
  while time.time() < deadline and proc.poll() is None:
    if any(m["phase"] == "stage2" and m["step"] >= 5 for m in _metrics(workdir)):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(m["step"] for m in _metrics(workdir) if m["phase"] == "stage2")
  assert killed_at < 12

  out = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  log = out.stdout + out.stderr
  assert "resuming from" in log and "stage2" in log
  # Base and Stage I were finished: not trained again.
  assert "[base] step" not in log and "[stage1] step" not in log

  rows = _metrics(workdir)
  stage2 = [m["step"] for m in rows if m["phase"] == "stage2"]
  assert max(stage2) == 12
  resumed = int(re.search(r"\[stage2\] resuming from \S+/stage2/(\d+)", log).group(1))
  # From a real checkpoint (every 2 steps) at or before the kill, not from the start.
  assert 0 < resumed <= killed_at and resumed % 2 == 0, (resumed, killed_at)
  # Each step once: the rows the killed run wrote past its checkpoint were dropped, and
  # the second run wrote them again after the resume step.
  assert stage2 == list(range(1, 13)), stage2
  assert max(m["time"] for m in rows if m["phase"] == "stage2" and m["step"] <= resumed) < min(
      m["time"] for m in rows if m["phase"] == "stage2" and m["step"] > resumed)
  for key in ("r1", "r2", "delta", "kl1", "kl2", "entropy", "edit_ratio", "tokens_per_s"):
    assert key in rows[-1], key

  table = json.load(open(os.path.join(workdir, "eval", "table.json")))
  assert set(table) == {"base", "stage1", "stage2"}
  for r in table.values():
    assert r["n"] == 24
    assert 0 <= r["acc_t1"] <= 1 and 0 <= r["acc_t2"] <= 1
    assert abs(r["delta"] - (r["acc_t2"] - r["acc_t1"])) < 1e-6
    assert abs(r["delta"] - (r["delta_i2c"] - r["delta_c2i"])) < 1e-6
  assert os.path.getsize(os.path.join(workdir, "eval", "table.png")) > 1000
  transcripts = open(os.path.join(workdir, "eval", "transcripts_stage2.jsonl")).readlines()
  assert len(transcripts) == 5
  assert {"problem", "y1", "y2", "r1", "r2"} <= set(json.loads(transcripts[0]))
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  assert os.listdir(os.path.join(workdir, "tb"))

  # The same seed without the kill gives exactly the same metrics: resumption is exact
  # and the run is deterministic.
  fresh = str(tmp_path / "fresh")
  out = subprocess.run(_cmd(fresh), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  volatile = ("time", "step_time", "tokens_per_s", "sample_time", "score_time", "train_time",
              "sample_tokens_per_s")
  def last_by_step(rows_):  # After a resume a step may appear twice; the last one counts.
    return {(m["phase"], m["step"]): {k: v for k, v in m.items() if k not in volatile}
            for m in rows_}
  assert last_by_step(_metrics(fresh)) == last_by_step(rows)
  assert json.load(open(os.path.join(fresh, "eval", "table.json"))) == table

  # Evaluation alone restores the checkpoints and reproduces the training-time numbers.
  ev = subprocess.run(_cmd(workdir, "--config.mode=eval"), cwd=REPO, env=_env(),
                      capture_output=True, text=True, timeout=900)
  assert ev.returncode == 0, ev.stderr[-3000:]
  table2 = json.load(open(os.path.join(workdir, "eval", "table.json")))
  for name in table:
    assert table2[name]["acc_t1"] == table[name]["acc_t1"]
    assert table2[name]["acc_t2"] == table[name]["acc_t2"]


@pytest.mark.parametrize("override,field", [
    ("--config.rl.kl_estimator=k7", "rl.kl_estimator"),
    ("--config.mode=dance", "mode"),
    ("--config.tokenizer.path=/nonexistent/tok.model", "tokenizer.path"),
    ("--config.rl.samples_per_prompt=1", "rl.samples_per_prompt"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.init.source=hub", "init.source"),
    ("--config.init.source=hf", "init.checkpoint"),
    ("--config.recipe=scroe", "recipe"),
    ("--config.phases.stage2.init=stage3", "phases.stage2.init"),
    ("--config.phases.stage1.train_turns=(3,)", "phases.stage1.train_turns"),
    ("--config.phases.stage1.kl_coefs=(0.1,0.1,0.1)", "phases.stage1.kl_coefs"),
    ("--config.rl.kl_form=exact", "rl.kl_form"),
    ("--config.rollout.temperature=0.7", "rollout.temperature"),
    ("--config.phases.stage2.offline_turn1=0.3", "phases.stage2.offline_turn1"),
    ("--config.task.name=mathh", "task.name"),
    ("--config.prompt_format=chatml", "prompt_format"),
    ("--config.rl.microbatches=3", "rl.microbatches"),
    ("--config.rollout.batch_size=24", "rollout.batch_size"),
    ("--config.rollout.slots=-4", "rollout.slots"),
    ("--config.rollout.live_spans=0", "rollout.live_spans"),
])
def test_bad_config_names_the_field(monkeypatch, override, field):
  # The CLI's own parsing (ml_collections reads the overrides from sys.argv) and its check,
  # in this process: a subprocess per case spent its time importing JAX.
  argv = _cmd("unused", override)[2:]
  monkeypatch.setattr(sys, "argv", argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
  flag_values(argv, known_only=True)
  with pytest.raises(ConfigError, match=re.escape(f"config.{field}")):
    config_defaults.check(flag_values.config, 1)


def test_bad_config_exits_2_naming_the_field(tmp_path):
  out = subprocess.run(_cmd(str(tmp_path / "run"), "--config.tokenizer.path=/nonexistent/tok.model"),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "error: config.tokenizer.path='/nonexistent/tok.model': no such file" in out.stderr, (
      out.stderr[-2000:])
  assert not os.path.exists(tmp_path / "run" / "base")  # refused before any work


def test_url_workdir_is_refused_by_name():
  out = subprocess.run(_cmd("gs://bucket/runs/demo"), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=60)
  assert out.returncode != 0
  assert "--workdir=gs://bucket/runs/demo: a URL workdir is not supported" in out.stderr
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing made under a mangled path


def test_zero_step_phase_eval_mode_and_changed_settings(tmp_path):
  """A phase of 0 steps is its init's params: trained and evaluated without a checkpoint,
  and --config.mode=eval handles it; a workdir trained under other settings is refused."""
  workdir = str(tmp_path / "run")
  short = ["--config.phases.stage2.steps=2"]
  out = subprocess.run(_cmd(workdir, "--config.phases.stage1.steps=0", *short), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "stage1"))
  table = json.load(open(os.path.join(workdir, "eval", "table.json")))
  assert table["stage1"]["same_as"] == "base"
  assert table["stage1"]["acc_t1"] == table["base"]["acc_t1"]
  ev = subprocess.run(_cmd(workdir, "--config.phases.stage1.steps=0", *short, "--config.mode=eval"),
                      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
  again = json.load(open(os.path.join(workdir, "eval", "table.json")))
  assert set(again) == {"base", "stage1", "stage2"}
  assert again["stage2"]["acc_t2"] == table["stage2"]["acc_t2"]
  # Same workdir, another learning rate for the trained Stage II: refused, naming it.
  bad = subprocess.run(_cmd(workdir, "--config.phases.stage1.steps=0", *short,
                            "--config.phases.stage2.learning_rate=0.1"),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert bad.returncode == 2
  assert "phase.learning_rate: 2e-05 -> 0.1" in bad.stderr, bad.stderr[-2000:]


def test_three_attempt_recipe_runs_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  out = subprocess.run(
      _cmd(workdir, "--config.recipe=score3", "--config.phases.stage1a.steps=2",
           "--config.phases.stage1b.steps=2", "--config.phases.stage2_3turn.steps=2"),
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  table = json.load(open(os.path.join(workdir, "eval", "table.json")))
  assert list(table) == ["base", "stage1a", "stage1b", "stage2_3turn"]
  for r in table.values():
    assert {"acc_t1", "acc_t2", "acc_t3", "delta_t1_t2", "delta_t2_t3"} <= set(r)
  rows = _metrics(workdir)
  assert {"r1", "r2"} <= set(next(r for r in rows if r["phase"] == "stage1a"))
  assert "r3" not in next(r for r in rows if r["phase"] == "stage1a")  # samples two attempts
  assert {"r1", "r2", "r3", "kl3"} <= set(next(r for r in rows if r["phase"] == "stage1b"))
  transcripts = open(os.path.join(workdir, "eval", "transcripts_stage2_3turn.jsonl")).readlines()
  assert {"y1", "y2", "y3", "r3"} <= set(json.loads(transcripts[0]))
