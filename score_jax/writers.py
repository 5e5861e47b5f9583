"""Metric sinks: JSONL (every step), TensorBoard event files, and a console line with ETA.

A resumed phase writes each step once. A run killed at step 61 after its checkpoint at
50 has already written rows 51..61; the resumed writer is told it starts after step 50
(`resume_step`), drops this phase's rows past it from metrics.jsonl (rewritten through a
temporary file and a rename, so a kill leaves the old or the new file, never half of
one) and gives TensorBoard `purge_step=51`: its reader hides the old events from step 51
on. Only one process writes (process 0 by default), so the hosts of a slice do not
append the same rows. A `gs://` workdir is written through etils.epath (JSONL) and
tensorboardX's GCS writer (`pip install -e .[gcs]`).
"""
import json
import time
from typing import Mapping, Optional

import jax
import numpy as np
from etils import epath

from score_jax.checkpoints import resolve_path


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


def drop_rows_after(path: str, phase: str, step: int) -> int:
  """Removes `phase`'s rows with a step > `step` from the JSONL file at `path` (and a torn
  last line of a killed writer); other phases' rows stay. Returns how many were dropped."""
  path = epath.Path(path)
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      dropped += 1
      continue
    if row.get("phase") == phase and row.get("step", 0) > step:
      dropped += 1
    else:
      kept.append(line)
  if dropped:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
  return dropped


def read_rows(workdir: str, phase: Optional[str] = None) -> list:
  """The rows of <workdir>/metrics.jsonl (of `phase`, if given); [] when there is none."""
  path = epath.Path(resolve_path(workdir)) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if phase is None or r.get("phase") == phase]


class MetricWriter:
  """Writes one phase's per-step scalars to <workdir>/metrics.jsonl and <workdir>/tb/<phase>.

  `resume_step` (required, so no caller forgets it): the step the phase (re)starts after,
  its checkpoint's, 0 for a fresh start; see the module docstring. `is_writer`: whether this process writes at all;
  default `jax.process_index() == 0`.
  """

  def __init__(self, workdir: str, phase: str, total_steps: int, log_every: int = 10, *,
               resume_step: int, is_writer: Optional[bool] = None):
    self.phase, self.total, self.log_every = phase, total_steps, max(log_every, 1)
    self.is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    self._t0, self._first_step = None, None
    if not self.is_writer:
      return
    from tensorboardX import SummaryWriter  # Event files without TensorFlow.
    workdir = epath.Path(resolve_path(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    jsonl = workdir / "metrics.jsonl"
    drop_rows_after(str(jsonl), phase, resume_step)
    self._jsonl = jsonl.open("a")
    # The suffix orders event files of one second by creation (TensorBoard reads a
    # directory's files in name order) and keeps a reopened writer from truncating the
    # file of the writer before it: tensorboardX names files by the second only.
    self._tb = SummaryWriter(str(workdir / "tb" / phase), purge_step=resume_step + 1,
                             filename_suffix=f".{time.time_ns():020d}")

  def write(self, step: int, metrics: Mapping[str, object]):
    """`step` counts completed steps (1..total)."""
    if not self.is_writer:
      return
    scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    self._jsonl.write(json.dumps(dict(phase=self.phase, step=step, time=time.time(), **scalars)) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    for k, counts in metrics.items():  # Already binned over [0, 1]: `..._hist` lists.
      if k.endswith("_hist"):
        self._histogram(k, np.asarray(counts, np.float64), step)
    now = time.time()
    if self._t0 is None:  # ETA from steps after the first (which includes compilation).
      self._t0, self._first_step = now, step
    if step % self.log_every == 0 or step == self.total:
      done = step - self._first_step
      eta = (now - self._t0) / done * (self.total - step) if done > 0 else float("nan")
      shown = " ".join(f"{k} {scalars[k]:.3g}" for k in _CONSOLE if k in scalars)
      print(f"[{self.phase}] step {step}/{self.total} | {shown} | ETA {_duration(eta)}", flush=True)

  def _histogram(self, tag: str, counts, step: int):
    """Counts of equal bins of [0, 1] as a TensorBoard histogram (e.g. the edit ratio
    between attempts: mass at 0 is the paper's collapse)."""
    edges = np.linspace(0.0, 1.0, len(counts) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    self._tb.add_histogram_raw(
        tag, min=0.0, max=1.0, num=float(counts.sum()), sum=float((counts * centers).sum()),
        sum_squares=float((counts * centers**2).sum()), bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(), global_step=step)

  def close(self):
    if self.is_writer:
      self._jsonl.close()
      self._tb.close()


_CONSOLE = ("loss", "r1", "r2", "delta", "kl1", "kl2", "entropy", "edit_ratio", "step_time",
            "sample_time", "score_time", "train_time", "tokens_per_s")


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"
