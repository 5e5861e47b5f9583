"""Metric sinks: JSONL (every step), TensorBoard event files, and a console line with ETA."""
import json
import os
import time
from typing import Mapping

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


class MetricWriter:
  """Writes one phase's per-step scalars to <workdir>/metrics.jsonl and <workdir>/tb/<phase>."""

  def __init__(self, workdir: str, phase: str, total_steps: int, log_every: int = 10):
    from tensorboardX import SummaryWriter  # Event files without TensorFlow.
    os.makedirs(workdir, exist_ok=True)
    self.phase, self.total, self.log_every = phase, total_steps, max(log_every, 1)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb", phase))
    self._t0, self._first_step = None, None

  def write(self, step: int, metrics: Mapping[str, object]):
    """`step` counts completed steps (1..total)."""
    scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    self._jsonl.write(json.dumps(dict(phase=self.phase, step=step, time=time.time(), **scalars)) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    now = time.time()
    if self._t0 is None:  # ETA from steps after the first (which includes compilation).
      self._t0, self._first_step = now, step
    if step % self.log_every == 0 or step == self.total:
      done = step - self._first_step
      eta = (now - self._t0) / done * (self.total - step) if done > 0 else float("nan")
      shown = " ".join(f"{k} {scalars[k]:.3g}" for k in _CONSOLE if k in scalars)
      print(f"[{self.phase}] step {step}/{self.total} | {shown} | ETA {_duration(eta)}", flush=True)

  def close(self):
    self._jsonl.close()
    self._tb.close()


_CONSOLE = ("loss", "r1", "r2", "delta", "kl1", "kl2", "entropy", "edit_ratio", "step_time",
            "tokens_per_s")


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"
