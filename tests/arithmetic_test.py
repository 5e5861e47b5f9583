"""The embedded arithmetic task: arithmetic, student, split, reward, registry."""
import re
from fractions import Fraction

import ml_collections
import numpy as np
import pytest

from score_jax import tasks
from score_jax.tasks import arithmetic as ar

_RESPONSE_RE = re.compile(r'Answer (\d+)\. Check (.*) so (\d+)\.')
_STEP_RE = re.compile(r'(\d)\+(\d)(\+1)?=(\d+)')


def _task(**overrides):
  return tasks.get_task(ml_collections.ConfigDict(dict(name='arithmetic', **overrides)))


@pytest.mark.parametrize('a,b,carries,carry_free', [
    (347, 586, 2, 823),
    (123, 456, 0, 579),
    (999, 999, 3, 888),
    (950, 160, 2, 10),   # 0+0=0, 5+6=11, 9+1+1=11 -> digits 0,1,0
    (905, 105, 2, 0),    # 5+5, 0+0+1, 9+1: every column wraps to 0
    (150, 250, 1, 300),  # only the middle column carries
    (500, 600, 1, 100),  # carry out of the top column counts
    (7, 8, 1, 5),
])
def test_carries_and_carry_free_sum_on_hand_examples(a, b, carries, carry_free):
  assert ar.count_carries(a, b) == carries
  assert ar.carry_free_sum(a, b) == carry_free


def test_response_format_on_hand_example():
  assert ar.check_text(347, 586) == '7+6=13, 4+8+1=13, 3+5+1=9 so 933'
  assert ar.correct_response(347, 586) == (
      'Answer 933. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.')
  assert ar.correct_response(947, 586) == (
      'Answer 1533. Check 7+6=13, 4+8+1=13, 9+5+1=15 so 1533.')
  task = _task()
  p = task.make_problem(347, 586)
  assert task.prompt(p) == 'Add 347+586.'
  assert task.correction_instruction == (
      'There might be an error in the answer above. Check it and correct it if needed.')


@pytest.mark.parametrize('xs,carries,carry_free,check', [
    ((37, 25, 49), 2, 91, '7+5+9=21, 3+2+4+2=11 so 111'),
    ((99, 99, 99, 99), 2, 66, '9+9+9+9=36, 9+9+9+9+3=39 so 396'),  # carry of 3
    ((10, 20, 30), 0, 60, '0+0+0=0, 1+2+3=6 so 60'),
    ((5, 5, 5, 5, 5), 1, 5, '5+5+5+5+5=25 so 25'),
])
def test_several_operands_on_hand_examples(xs, carries, carry_free, check):
  assert ar.count_carries(*xs) == carries
  assert ar.carry_free_sum(*xs) == carry_free
  assert ar.check_text(*xs) == check
  assert ar.correct_response(*xs) == f'Answer {sum(xs)}. Check {check}.'


def test_several_operands_split_problems_and_student():
  task = _task(num_digits=2, num_operands=3, slip_prob=0.0)
  held_out = task._eval_tuples
  assert held_out.shape[1] == 3
  assert 0.095 < len(held_out) / 90**3 < 0.105
  eval_ids = {'+'.join(map(str, xs)) for xs in held_out}
  train = task.train_problems(np.random.default_rng(6), 20_000)
  assert not eval_ids & {p.id for p in train}
  rng = np.random.default_rng(7)
  for p in train[:500]:
    assert p.prompt.count('+') == 2 and p.answer == str(sum(p.meta['operands']))
    assert task.reward(task.student(p, rng), p) == 1.0  # slip_prob=0: always right.
  # Too many tuples to list (90^4): sampled from a fixed seed, still held-out and stable.
  four = _task(num_digits=2, num_operands=4)
  assert four._eval_tuples is None
  got = four.eval_problems(200)
  assert [p.id for p in got] == [p.id for p in _task(num_digits=2, num_operands=4).eval_problems(200)]
  assert all(four.is_eval(np.array([p.meta['operands']]))[0] for p in got)
  # Two operands: the same split and the same problems as earlier releases (values from
  # the release before `num_operands`), so the demo's results carry over.
  pairs = np.array([[347, 586], [0, 0], [12, 99]])
  np.testing.assert_array_equal(ar.operands_hash(pairs), ar.pair_hash(pairs[:, 0], pairs[:, 1]))
  demo = _task(num_digits=2, eval_fraction=0.125)
  assert [p.id for p in demo.eval_problems(3)] == ['37+67', '20+72', '11+84']
  assert [p.id for p in demo.train_problems(np.random.default_rng(0), 4)] == [
      '86+57', '67+43', '56+37', '34+48']
  with pytest.raises(ValueError, match='num_operands'):
    _task(num_operands=1)


@pytest.mark.parametrize('response,expected', [
    ('Answer 933. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.', 1.0),
    ('Answer 933.', 1.0),
    ('Answer 933', 1.0),
    ('Answer 933. Check nonsense so 12.', 1.0),  # only the claimed answer counts
    ('Answer 823. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.', 0.0),
    ('Answer 833. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.', 0.0),
    ('Answer 9330.', 0.0),
    ('Answer 93.', 0.0),
    ('', 0.0),
    ('933', 0.0),
    ('Answer: 933.', 0.0),
    ('answer 933.', 0.0),
    ('Answer x933.', 0.0),
    ('Answer 933a.', 0.0),
    ('Check 7+6=13 so 933. Answer 933.', 0.0),  # the answer must come first
])
def test_reward(response, expected):
  task = _task()
  assert task.reward(response, task.make_problem(347, 586)) == expected


def test_student_work_is_always_right_and_slips_only_on_hard_problems():
  task = _task()
  rng = np.random.default_rng(0)
  for p in task.train_problems(rng, 2000):
    a, b = p.meta['operands']
    y = task.student(p, rng)
    m = _RESPONSE_RE.fullmatch(y)
    assert m, y
    claimed, work, result = int(m.group(1)), m.group(2), int(m.group(3))
    assert result == a + b
    steps = work.split(', ')
    assert len(steps) == 3
    carry = 0
    for i, step in enumerate(steps):
      x, z, carry_in, s = _STEP_RE.fullmatch(step).groups()
      assert (int(x), int(z)) == (a // 10**i % 10, b // 10**i % 10)
      assert bool(carry_in) == bool(carry)
      assert int(s) == int(x) + int(z) + carry
      carry = int(s) >= 10
    if ar.count_carries(a, b) >= 2:
      assert claimed in (a + b, ar.carry_free_sum(a, b))
    else:
      assert claimed == a + b
    assert task.reward(y, p) == float(claimed == a + b)


def test_empirical_slip_rate_matches_config():
  rng = np.random.default_rng(1)
  for slip_prob in (0.7, 0.3):
    task = _task(slip_prob=slip_prob)
    hard = [p for p in task.train_problems(rng, 8000) if p.meta['carries'] >= 2]
    slips = [task.reward(task.student(p, rng), p) == 0.0 for p in hard]
    assert len(hard) > 3000
    assert abs(np.mean(slips) - slip_prob) < 0.03


def test_expected_base_accuracy_by_enumeration():
  # Vectorised, independent carry count over all 810,000 pairs.
  a, b = (x.ravel() for x in np.meshgrid(np.arange(100, 1000), np.arange(100, 1000)))
  carries, carry = np.zeros_like(a), np.zeros_like(a)
  for i in range(3):
    carry = (a // 10**i % 10 + b // 10**i % 10 + carry >= 10).astype(a.dtype)
    carries += carry
  rng = np.random.default_rng(2)
  for k in rng.integers(0, a.size, 200):
    assert ar.count_carries(int(a[k]), int(b[k])) == carries[k]
  hard = Fraction(int((carries >= 2).sum()), a.size)
  assert hard == Fraction(1879, 3600)
  assert 1 - Fraction(7, 10) * hard == Fraction(22847, 36000)


def test_heldout_never_in_training():
  task = _task()
  eval_ids = {f'{a}+{b}' for a, b in task._eval_tuples}
  assert 0.095 < len(eval_ids) / 810_000 < 0.105
  train = task.train_problems(np.random.default_rng(3), 50_000)
  assert len(train) == 50_000
  assert not eval_ids & {p.id for p in train}
  assert all(all(100 <= x <= 999 for x in p.meta['operands']) for p in train)


def test_eval_problems_deterministic_and_prefix_stable():
  first = _task().eval_problems(300)
  again = _task().eval_problems(300)
  assert [p.id for p in first] == [p.id for p in again]
  assert [p.id for p in _task().eval_problems(50)] == [p.id for p in first[:50]]
  assert len({p.id for p in first}) == 300
  assert all(p.answer == str(sum(p.meta['operands'])) for p in first)
  # The split is a fixed function (splitmix64): pin it so it cannot drift silently.
  assert int(ar.pair_hash(0, 0)) == 0xE220A8397B1DCDAF
  assert int(ar.pair_hash(347, 586)) == 12507540800544150293


def test_eval_problems_too_many_raises():
  task = _task(num_digits=1)
  available = len(task._eval_tuples)
  assert len(task.eval_problems(available)) == available
  with pytest.raises(ValueError, match='held-out split'):
    task.eval_problems(available + 1)


def test_base_transcripts_are_independent_attempts():
  task = _task()
  rng = np.random.default_rng(4)
  rows = task.base_transcripts(rng, 6000)
  hard = [(task.reward(y1, p), task.reward(y2, p)) for p, (y1, y2) in rows
          if p.meta['carries'] >= 2]
  r = np.array(hard)
  # Independent slips: P(both wrong) ~ 0.7^2, P(exactly one wrong) ~ 2 * 0.7 * 0.3.
  assert abs(np.mean((r[:, 0] == 0) & (r[:, 1] == 0)) - 0.49) < 0.04
  assert abs(np.mean(r[:, 0] != r[:, 1]) - 0.42) < 0.04
  # Three attempts: three independent draws per problem.
  rows = task.base_transcripts(np.random.default_rng(4), 2000, turns=3)
  assert all(len(ys) == 3 for _, ys in rows)
  r = np.array([[task.reward(y, p) for y in ys] for p, ys in rows if p.meta['carries'] >= 2])
  assert abs(np.mean(r.sum(1) == 0) - 0.7**3) < 0.05


def test_corpus_has_every_kind_of_text():
  task = _task()
  texts = list(task.corpus(np.random.default_rng(5), 103))
  assert len(texts) == 103
  assert task.correction_instruction in texts
  assert any(t.startswith('Add ') for t in texts)
  assert any(t.startswith('Answer ') for t in texts)


def test_registry_errors_and_overrides():
  with pytest.raises(ValueError, match='arithmetic'):
    tasks.get_task(ml_collections.ConfigDict(dict(name='nope')))
  with pytest.raises(ValueError, match='slip_porb'):
    _task(slip_porb=0.5)
  never = _task(slip_prob=0.0)
  rng = np.random.default_rng(6)
  assert all(never.reward(never.student(p, rng), p) == 1.0
             for p in never.train_problems(rng, 300))


@pytest.mark.parametrize('response,expected', [
    ('37 + 67 = 104', 1.0), ('The sum of 37 and 67 is 37+67 = 104.', 1.0),
    ('\n104\n\nThis is a classic problem: 3 steps.', 1.0), ('37 + 67 = 104.5', 0.0),
    ('37 + 67 = 140\nNo, 104.', 0.0),
    ('37 + 67 = 140, or 104 in base 8? No: 140.', 0.0), ('It is x104.', 0.0),
    ('The answer is -104.', 0.0), ('no number', 0.0)])
def test_first_line_reward_for_chat_models(response, expected):
  task = _task(num_digits=2, answer_format='first_line',
               prompt_template='What is {problem}? Answer with the number.')
  problem = task.make_problem(37, 67)
  assert task.prompt(problem) == 'What is 37+67? Answer with the number.'
  assert task.reward(response, problem) == expected
  with pytest.raises(ValueError, match='answer_format'):
    _task(answer_format='first_word')


def test_base_task_without_a_student_raises():
  class Bare(ar.ArithmeticTask):
    name = 'bare'
    student = tasks.Task.student

  with pytest.raises(NotImplementedError, match='bare'):
    Bare().base_transcripts(np.random.default_rng(0), 1)


def test_consistent_slips_write_the_carry_free_work():
  """slip_check='consistent': the slipped answer's check drops the carries too, so the right
  sum is written nowhere; right answers keep the right check."""
  assert ar.check_text(37, 67, carries=False) == '7+7=14, 3+6=9 so 94'
  assert ar.check_text(347, 586, carries=False) == '7+6=13, 4+8=12, 3+5=8 so 823'
  task = _task(num_digits=2, slip_prob=1.0, slip_check='consistent')
  rng = np.random.default_rng(0)
  slipped = task.student(task.make_problem(37, 67), rng)
  assert slipped == 'Answer 94. Check 7+7=14, 3+6=9 so 94.'
  assert '104' not in slipped and task.reward(slipped, task.make_problem(37, 67)) == 0.0
  easy = task.student(task.make_problem(12, 34), rng)  # no carry: never a slip
  assert easy == 'Answer 46. Check 2+4=6, 1+3=4 so 46.'
  default = _task(num_digits=2, slip_prob=1.0)  # slip_check='right': the total shows 104
  assert default.student(task.make_problem(37, 67), rng) == 'Answer 94. Check 7+7=14, 3+6+1=10 so 104.'
  with pytest.raises(ValueError, match='slip_check'):
    _task(slip_check='sometimes')


def test_answer_key_is_the_claimed_number():
  task = _task(num_digits=2)
  assert task.answer_key('Answer 104. Check 7+7=14, 3+6+1=10 so 104.') == '104'
  assert task.answer_key('Answer 0104. Check') == '104'
  assert task.answer_key('104') is None
