"""The training loop with the host waiting for each update against the host making the
next batch while the update runs (`train.host_waits_for_updates`), on the demo's base
(SFT) phase: the same steps, alternated A-B-A-B in one process.

  python bench/bench_loop.py                 # 80 steps, 2 pairs
  python bench/bench_loop.py --quick         # tiny smoke run

Both ways train the same params (checked); the figure is the median step period from the
metrics' row times past the first 5 steps (compilation), and the ratio overlap / wait.
"""
import argparse
import shlex
import sys
import tempfile

import jax
import numpy as np

from score_jax import config_defaults
from score_jax import run as run_lib
from score_jax import train
from score_jax import writers


def _phase_run(steps: int, overlap: bool, workdir: str, tiny: bool):
  config = config_defaults.get_config()
  config.phases.base.steps = steps
  if tiny:
    config.model.update(embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2, head_dim=16)
  waits = train.host_waits_for_updates
  train.host_waits_for_updates = lambda: not overlap
  run = run_lib.Run(config, workdir)
  try:
    params = run.train(run.by_name["base"])
  finally:
    run.close()
    train.host_waits_for_updates = waits
  t = np.array([r["time"] for r in writers.read_rows(workdir, "base")])
  return float(np.median(np.diff(t)[5:])), params


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=80)
  p.add_argument("--pairs", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="tiny model, 8 steps, one pair")
  a = p.parse_args(argv)
  if a.quick:
    a.steps, a.pairs = 8, 1
  print("command: python bench/bench_loop.py " + shlex.join(argv), flush=True)
  periods = {False: [], True: []}
  for i in range(a.pairs):
    params = {}
    for overlap in (False, True):
      with tempfile.TemporaryDirectory() as d:
        period, params[overlap] = _phase_run(a.steps, overlap, d, a.quick)
      periods[overlap].append(period)
      print(f"pair {i + 1} {'overlap' if overlap else 'wait':7s}: "
            f"{period * 1e3:.1f} ms per step", flush=True)
    if not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(params[False]), jax.tree.leaves(params[True]))):
      raise SystemExit("the two loops trained different params")
  ratio = [o / w for o, w in zip(periods[True], periods[False])]
  print(f"overlap / wait step period: {' '.join(f'{r:.3f}' for r in ratio)} "
        f"(median {np.median(ratio):.3f}; > 1: overlapping is slower)", flush=True)
  return periods


if __name__ == "__main__":
  main(sys.argv[1:])
