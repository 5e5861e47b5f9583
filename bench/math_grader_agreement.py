"""Agreement of MATH answer graders with hand labels (tests/data/math_equiv_labels.jsonl).

  python bench/math_grader_agreement.py

Prints, side by side, the agreement of (a) plain math-verify (both answers wrapped in
`\\boxed{}`, default settings) and (b) `score_jax.tasks.rewards.math_grader.is_equivalent`, per category
and overall, then every row where either disagrees with the label, with the row's note
and, for our grader, its `known_miss` explanation.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time

from score_jax.tasks.rewards import math_grader

LABELS = os.path.join(os.path.dirname(__file__), '..', 'tests', 'data',
                      'math_equiv_labels.jsonl')


def load_rows(path: str = LABELS) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plain_math_verify(pred: str, ref: str) -> bool:
  import math_verify  # pylint: disable=import-outside-toplevel
  return bool(math_verify.verify(math_verify.parse(f'\\boxed{{{ref}}}'),
                                 math_verify.parse(f'\\boxed{{{pred}}}')))


def main() -> int:
  logging.getLogger('math_verify').setLevel(logging.ERROR)
  rows = load_rows()
  graders = {'math-verify': plain_math_verify, 'ours': math_grader.is_equivalent}
  results, seconds = {}, {}
  for name, fn in graders.items():
    t0 = time.perf_counter()
    results[name] = [fn(r['response'], r['reference']) for r in rows]
    seconds[name] = time.perf_counter() - t0
  by_cat = collections.defaultdict(lambda: collections.Counter())
  for i, r in enumerate(rows):
    by_cat[r['category']]['n'] += 1
    for name in graders:
      by_cat[r['category']][name] += results[name][i] == r['label']
  print(f'{"category":<18} {"n":>4} {"math-verify":>12} {"ours":>6}')
  for cat, c in by_cat.items():
    print(f'{cat:<18} {c["n"]:>4} {c["math-verify"]:>12} {c["ours"]:>6}')
  n = len(rows)
  for name in graders:
    agree = sum(v == r['label'] for v, r in zip(results[name], rows))
    print(f'{name:<12} agreement {agree}/{n} = {agree / n:.3f}  ({seconds[name]:.1f} s)')
  print('\nrows where a grader disagrees with the label:')
  for i, r in enumerate(rows):
    mv, ours = results['math-verify'][i], results['ours'][i]
    if mv != r['label'] or ours != r['label']:
      print(f'[{r["category"]}] ref={r["reference"]!r} response={r["response"]!r} '
            f'label={r["label"]} math-verify={mv} ours={ours}  note: {r["note"]}')
      if ours != r['label']:
        print(f'    ours wrong; known_miss: {r.get("known_miss", "NOT LISTED")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
