"""The MATH grader: agreement with hand labels, extraction, commitment, exact values,
robustness."""
from __future__ import annotations

import concurrent.futures
import fractions
import json
import multiprocessing
import os
import pickle
import threading
import time

import pytest

from score_jax.tasks.rewards import math_extract, math_grader

LABELS = os.path.join(os.path.dirname(__file__), 'data', 'math_equiv_labels.jsonl')
# Measured 446/447 (379 original pairs 378, 68 adversarial 68); plain math-verify 390/447
# (bench/math_grader_agreement.py).
MIN_AGREEMENT = 0.995


def _rows():
  with open(LABELS) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_label_set_is_balanced_per_category():
  rows = _rows()
  assert len(rows) >= 200
  by_cat = {}
  for r in rows:
    by_cat.setdefault(r['category'], set()).add(r['label'])
  assert all(labels == {True, False} for labels in by_cat.values()), by_cat


def _ours(row: dict) -> bool:
  if row.get('kind') == 'response':
    return math_grader.grade(row['response'], row['reference']) == 1.0
  return math_grader.answer_verdict(row['response'], row['reference']) == 'right'


def test_agreement_with_labels_and_exact_known_misses():
  rows = _rows()
  assert sum(bool(r.get('adversarial')) for r in rows) >= 50
  wrong = {(r['reference'], r['response']) for r in rows if _ours(r) != r['label']}
  known = {(r['reference'], r['response']) for r in rows if 'known_miss' in r}
  assert wrong == known, f'new misses: {wrong - known}; fixed: {known - wrong}'
  assert 1 - len(wrong) / len(rows) >= MIN_AGREEMENT


def test_adversarial_rows_are_refused_with_a_countable_reason():
  """Every adversarial row labelled wrong that holds the right value somewhere is refused
  as a hedge or as unevaluated, not merely graded wrong: that is what the task counts."""
  reasons = {}
  for r in _rows():
    if r.get('adversarial') and not r['label']:
      got = (math_grader.verdict(r['response'], r['reference']) if r.get('kind') == 'response'
             else math_grader.answer_verdict(r['response'], r['reference']))
      reasons.setdefault(r['category'], set()).add(got)
  assert reasons['hedge_several_final'] == reasons['hedge_list'] == {'hedged'}
  assert reasons['hedge_choices'] == {'hedged'} and reasons['free_variable'] == {'unevaluated'}
  assert 'hedged' in reasons['hedge_interval_set'] and 'unevaluated' in reasons['unevaluated']
  assert set().union(*reasons.values()) <= {'hedged', 'unevaluated', 'wrong'}


@pytest.mark.parametrize('text, ref, want', [
    ('The final answer is $4$. I hope it is correct.', '4', 'right'),
    ('The final answer is $3$. I hope it is correct.', '4', 'wrong'),
    ('I could not solve it.', '4', 'no_answer'),
    ('$\\boxed{4}$ or maybe $\\boxed{3}$', '4', 'hedged'),
    ('$\\boxed{2}$ or maybe $\\boxed{3}$', '4', 'wrong'),          # hedged, but nothing right
    ('The final answer is $\\binom{4}{1}$.', '4', 'unevaluated'),
    ('The final answer is $\\boxed{4}$, and $\\boxed{1}$ ... $\\boxed{7}$' +
     ''.join(f' $\\boxed{{{i}}}$' for i in range(10, 16)), '4', 'hedged'),  # > _MAX_ANSWERS
])
def test_verdict_of_a_response(text, ref, want):
  assert math_grader.verdict(text, ref) == want
  assert math_grader.grade(text, ref) == float(want == 'right')
  assert math_grader.verdict_code(text, ref) == math_grader.VERDICTS.index(want)


def test_verdict_code_zero_is_wrong():
  """The verifier pool writes 0.0 for a late or crashed item: that must read as wrong."""
  assert math_grader.VERDICTS[0] == 'wrong' and math_grader.VERDICTS[1] == 'right'


@pytest.mark.parametrize('text, want', [
    ('So x = 4.\nFinal Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.',
     '\\frac{1}{2}'),
    ('Final Answer: The final answer is 12. I hope it is correct.', '12'),
    ('Final Answer: The final answer is $\\boxed{(1, 2)}$. I hope it is correct.', '(1, 2)'),
    ('Final Answer: The final answer is $\\$32$. I hope it is correct.', '\\$32'),
    ('The final answer is \\boxed{\\frac{\\sqrt{3}}{2}}', '\\frac{\\sqrt{3}}{2}'),
    ('first $\\boxed{1}$ then $\\boxed{\\{1, 2\\}}$ at last', '\\{1, 2\\}'),
    ('answer: \\fbox{7}', '7'),
    ('The final answer is $3$.\nThe final answer is $5$. I hope it is correct.', '5'),
    ('The final answer is $3$ or $5$. I hope it is correct.', '3, 5'),
    ('no answer here', None),
    ('unbalanced \\boxed{1', None),
])
def test_extract_answer(text, want):
  assert math_extract.extract_answer(text) == want


@pytest.mark.parametrize('solution, want', [
    ('so the sum is $\\boxed{\\frac{1}{2}}$.', '\\frac{1}{2}'),
    ('$\\boxed{1}$ and then $\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$',
     '\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}'),
    ('the answer is $\\boxed 5$.', '5'),
    ('nothing boxed', None),
])
def test_last_boxed(solution, want):
  assert math_extract.last_boxed(solution) == want


@pytest.mark.parametrize('s, want', [
    ('12', fractions.Fraction(12)), ('-0.125', fractions.Fraction(-1, 8)),
    ('.5', fractions.Fraction(1, 2)), ('\\frac{3}{4}', fractions.Fraction(3, 4)),
    ('\\frac34', fractions.Fraction(3, 4)), ('-\\frac{3}{4}', fractions.Fraction(-3, 4)),
    ('\\frac{-3}{4}', fractions.Fraction(-3, 4)), ('7/2', fractions.Fraction(7, 2)),
    ('3\\frac{1}{2}', fractions.Fraction(7, 2)), ('0.1\\overline{6}', fractions.Fraction(1, 6)),
    ('0.\\overline{18}', fractions.Fraction(2, 11)), ('1.5e8', fractions.Fraction(150_000_000)),
    ('3.2\\times10^{-3}', fractions.Fraction(32, 10_000)),
    ('123456789012345678901234567891', fractions.Fraction(123456789012345678901234567891)),
    ('x+1', None), ('\\sqrt{2}', None), ('1/0', None),
])
def test_exact_value(s, want):
  assert math_grader.exact_value(s) == want


def test_grade_end_to_end():
  right = 'Step 1 ... Final Answer: The final answer is $0.5$. I hope it is correct.'
  wrong = 'Final Answer: The final answer is $0.49$. I hope it is correct.'
  assert math_grader.grade(right, '\\frac{1}{2}') == 1.0
  assert math_grader.grade(wrong, '\\frac{1}{2}') == 0.0
  assert math_grader.grade('I do not know.', '\\frac{1}{2}') == 0.0


@pytest.mark.parametrize('answer', [
    '2^{10^{10}}', '9^{9^{9}}', '100000000!', '10^{99999999}', '\\frac{', '}{', '$$',
    '\\begin{pmatrix}', '(' * 300 + '1', 'x' * 5000, '1e999999999',
])
def test_grade_never_raises_or_hangs(answer):
  start = time.perf_counter()
  assert math_grader.grade(f'The final answer is ${answer}$.', '5') == 0.0
  assert math_grader.grade('The final answer is $5$.', answer) == 0.0
  assert time.perf_counter() - start < 10


def test_off_main_thread_runs_without_alarm():
  """signal.alarm raises off the main thread; the grader must switch timeouts off."""
  out = []
  t = threading.Thread(target=lambda: out.append(
      (math_grader.is_equivalent('(x+1)^2', 'x^2+2x+1'),
       math_grader.is_equivalent('(x-1)^2', 'x^2+2x+1'))))
  t.start()
  t.join(60)
  assert out == [(True, False)]


def test_grade_is_pool_safe():
  assert pickle.loads(pickle.dumps(math_grader.grade)) is math_grader.grade
  responses = ['The final answer is $\\sqrt{8}$.', 'The final answer is $3$.']
  ctx = multiprocessing.get_context('spawn')  # as a pool beside JAX would use
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    got = list(pool.map(math_grader.grade, responses, ['2\\sqrt{2}'] * 2))
  assert got == [1.0, 0.0]
