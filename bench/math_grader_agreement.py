"""Agreement of MATH answer graders with hand labels (tests/data/math_equiv_labels.jsonl).

  python bench/math_grader_agreement.py

Prints, side by side, the agreement of (a) plain math-verify (the reference wrapped in
`\\boxed{}`; an answer row's answer too, a response row's text as it is; default settings)
and (b) ours: `math_grader.answer_verdict(...) == 'right'` for an answer row and
`math_grader.grade` for a response row (`"kind": "response"`), per category, on the
original pairs, on the adversarial ones (`"adversarial": true`: hedges and unevaluated
answers) and on all; then every row where either disagrees with the label, with the row's
note and, for our grader, its `known_miss` explanation.
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


def plain_math_verify(row: dict) -> bool:
  import math_verify  # pylint: disable=import-outside-toplevel
  target = row['response'] if row.get('kind') == 'response' else f'\\boxed{{{row["response"]}}}'
  return bool(math_verify.verify(math_verify.parse(f'\\boxed{{{row["reference"]}}}'),
                                 math_verify.parse(target)))


def ours(row: dict) -> bool:
  if row.get('kind') == 'response':
    return math_grader.grade(row['response'], row['reference']) == 1.0
  return math_grader.answer_verdict(row['response'], row['reference']) == 'right'


def main() -> int:
  logging.getLogger('math_verify').setLevel(logging.ERROR)
  rows = load_rows()
  graders = {'math-verify': plain_math_verify, 'ours': ours}
  results, seconds = {}, {}
  for name, fn in graders.items():
    t0 = time.perf_counter()
    results[name] = [fn(r) for r in rows]
    seconds[name] = time.perf_counter() - t0
  by_cat = collections.defaultdict(lambda: collections.Counter())
  for i, r in enumerate(rows):
    by_cat[r['category']]['n'] += 1
    for name in graders:
      by_cat[r['category']][name] += results[name][i] == r['label']
  print(f'{"category":<20} {"n":>4} {"math-verify":>12} {"ours":>6}')
  for cat, c in by_cat.items():
    print(f'{cat:<20} {c["n"]:>4} {c["math-verify"]:>12} {c["ours"]:>6}')
  sets = {'original': [not r.get('adversarial') for r in rows],
          'adversarial': [bool(r.get('adversarial')) for r in rows], 'all': [True] * len(rows)}
  for set_name, member in sets.items():
    n = sum(member)
    for name in graders:
      agree = sum(m and v == r['label'] for m, v, r in zip(member, results[name], rows))
      print(f'{set_name:<12} {name:<12} agreement {agree}/{n} = {agree / n:.3f}')
  for name in graders:
    print(f'{name}: {seconds[name]:.1f} s for {len(rows)} rows')
  print('\nrows where a grader disagrees with the label:')
  for i, r in enumerate(rows):
    mv, us = results['math-verify'][i], results['ours'][i]
    if mv != r['label'] or us != r['label']:
      print(f'[{r["category"]}] ref={r["reference"]!r} response={r["response"]!r} '
            f'label={r["label"]} math-verify={mv} ours={us}  note: {r["note"]}')
      if us != r['label']:
        print(f'    ours wrong; known_miss: {r.get("known_miss", "NOT LISTED")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
