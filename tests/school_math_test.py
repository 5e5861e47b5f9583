"""School-math task: the patched generator, determinism, the held-out split, rewards."""
import hashlib
import random
import time

import ml_collections
import numpy as np
import pytest
import sympy

from score_jax.tasks import _mathematics_dataset_shim as shim
from score_jax.tasks import school_math as sm


def _config(**kw):
  return ml_collections.ConfigDict({'verifier_workers': 0, **kw})


@pytest.fixture(scope='module')
def task():
  return sm.SchoolMathTask(_config())


def _final(answer):
  return f'We compute it.\nFinal Answer: The final answer is ${answer}$. I hope it is correct.'


@pytest.mark.parametrize('difficulty', shim.DIFFICULTIES)
def test_shim_generator_runs_under_numpy2_and_new_sympy(difficulty):
  modules = shim.generator_modules(difficulty)
  assert set(sm.DEFAULT_MODULES) <= set(modules)
  # polynomials__expand uses all three patched names (sympy's base_solution_linear,
  # np.object, ndarray.itemset); calculus__differentiate uses itemset.
  for name in sm.DEFAULT_MODULES + ('polynomials__expand', 'algebra__polynomial_roots'):
    kept = [qa for qa in (sm.generate(name, difficulty, seed) for seed in range(4)) if qa]
    assert kept, name  # (None = over the generator's own length caps, 160 / 30 chars.)
    assert all(0 < len(q) <= 160 and 0 < len(a) <= 30 for q, a in kept)
  # The numpy patches stay local to the generator's module.
  assert 'object' not in vars(np) and not hasattr(np.ndarray, 'itemset')


def test_generation_is_a_pure_function_of_the_seed():
  random.seed(5)
  np.random.seed(5)
  py_before, np_before = random.random(), np.random.random()
  random.seed(5)
  np.random.seed(5)
  a = sm.generate('calculus__differentiate', 'train-medium', 123)
  assert (random.random(), np.random.random()) == (py_before, np_before)  # Restored.
  assert sm.generate('calculus__differentiate', 'train-medium', 123) == a
  assert sm.generate('calculus__differentiate', 'train-medium', 124) != a


def test_train_problems_are_deterministic(task):
  a = task.train_problems(np.random.default_rng(7), 20)
  b = task.train_problems(np.random.default_rng(7), 20)
  c = task.train_problems(np.random.default_rng(8), 20)
  assert a == b
  assert [p.prompt for p in a] != [p.prompt for p in c]
  assert {p.meta['module'] for p in a + c} == set(sm.DEFAULT_MODULES)


def test_eval_is_fixed_prefix_and_disjoint_from_train(task):
  ev = task.eval_problems(15)
  other = sm.SchoolMathTask(_config(modules=list(reversed(sm.DEFAULT_MODULES))))
  assert task.eval_problems(10) == ev[:10]
  # Each module's held-out stream depends on its name, not on the list order.
  assert {p.prompt for p in other.eval_problems(15)} == {p.prompt for p in ev}
  assert len({p.prompt for p in ev}) == 15
  # Independent reference for the split: md5 of the question text.
  modulus = round(1 / task.config.eval_fraction)
  md5 = lambda q: int.from_bytes(hashlib.md5(q.encode()).digest()[:8], 'little')
  assert all(md5(p.prompt) % modulus == 0 for p in ev)
  train = task.train_problems(np.random.default_rng(0), 100)
  assert all(md5(p.prompt) % modulus != 0 for p in train)
  assert not {p.prompt for p in train} & {p.prompt for p in ev}


def test_small_question_space_still_disjoint(monkeypatch):
  """With a question space of 40 texts, training repeats questions but never a held-out
  one, and asking for more held-out questions than exist fails clearly."""
  monkeypatch.setattr(sm, 'generate', lambda module, difficulty, seed: (
      f'What is {seed % 40} + 1?', str(seed % 40 + 1)))
  t = sm.SchoolMathTask(_config(modules=['numbers__gcd'], eval_fraction=0.25))
  questions = {f'What is {i} + 1?' for i in range(40)}
  held_out = {q for q in questions if t.is_eval(q)}
  assert 0 < len(held_out) < 40
  ev = [p.prompt for p in t.eval_problems(len(held_out))]
  assert sorted(ev) == sorted(held_out)  # All of them, each once.
  train = [p.prompt for p in t.train_problems(np.random.default_rng(1), 200)]
  assert set(train) == questions - held_out
  with pytest.raises(RuntimeError, match="'numbers__gcd'.*too small"):
    t.eval_problems(len(held_out) + 1)


def test_config_errors():
  with pytest.raises(ValueError, match=r"'algebra__nope'.*valid: .*numbers__gcd"):
    sm.SchoolMathTask(_config(modules=['numbers__gcd', 'algebra__nope']))
  with pytest.raises(ValueError, match='unknown difficulty'):
    sm.SchoolMathTask(_config(difficulty='train-impossible'))
  with pytest.raises(ValueError, match='unknown school_math task fields'):
    sm.SchoolMathTask(_config(modul=['numbers__gcd']))
  with pytest.raises(ValueError, match='empty'):
    sm.SchoolMathTask(_config(modules=[]))


def test_prompt_and_instruction_are_the_paper_forms(task):
  p = task.train_problems(np.random.default_rng(0), 1)[0]
  text = task.prompt(p)
  assert text.endswith(p.prompt) and 'step by step' in text
  assert 'Final Answer: The final answer is $answer$. I hope it is correct.' in text
  assert task.correction_instruction.startswith('There might be an error in the solution')


@pytest.mark.parametrize('module', sm.DEFAULT_MODULES)
def test_reward_right_and_perturbed_answers(task, module):
  rng = np.random.default_rng(3)
  t = sm.SchoolMathTask(_config(modules=[module]))
  for p in t.train_problems(rng, 8):
    assert t.reward(_final(p.answer), p) == 1.0, p
    assert t.reward(_final(sm.wrong_answer(p.answer, rng)), p) == 0.0, p
    assert t.reward(f'So it is {p.answer}.', p) == 0.0  # No final-answer form.
    # The same value written differently (sympy is the independent reference).
    value = sympy.sympify(p.answer, rational=True)
    alt = (str(sympy.factor(value)) if value.free_symbols else
           f'{value * 3}/3' if value.is_integer else str(value))  # 0.5 -> 1/2
    assert t.reward(_final(alt), p) == 1.0, (p.answer, alt)


def test_answer_equivalence_cases():
  match = sm.answers_match
  assert match('0.5', '1/2') and match('5.0', '5') and match('-.25', '-1/4')
  assert not match('0.5001', '0.5') and not match('5', '-5') and not match('', '5')
  assert match('3*x**2 + 1', '1 + 3*x**2') and match('3*x^2+1', '3*x**2 + 1')
  assert not match('3x**2 + 1', '3*x**2 + 1')  # No implicit multiplication.
  assert match('x*(x + 2)', 'x**2 + 2*x') and not match('x**2 + 2', 'x**2 + 2*x')
  assert match('true', 'True') and not match('False', 'True')
  assert match('2, 3, 2297', '2,3,2297') and not match('2, 3', '2, 3, 2297')
  assert match('E*x', 'x*E')  # Single letters are symbols, not sympy's constants.
  assert sm.extract_answer('The final answer is 1. Final Answer: The final answer is '
                           '-52.4. I hope it is correct.') == '-52.4'
  assert sm.extract_answer('The final answer is $x**2 + 1$. I hope') == 'x**2 + 1'
  assert sm.extract_answer('no answer here') is None


def test_hostile_answers_are_refused_quickly():
  t0 = time.monotonic()
  for claimed in ['9**9**9**9', '10**100000000', "__import__('os').system('true')",
                  'x' * 1000, '1e999999999', '1e9999*x', '1.e99999999', '(lambda: 1)()',
                  '(x + 1)**10**6', '((x + 1)**7)**7', 'x**(9**9)']:
    assert not sm.answers_match(claimed, 'x**2 + 1')
    assert not sm.answers_match(claimed, '7')
  assert time.monotonic() - t0 < 2.0


def test_batch_rewards_in_workers_match_inline():
  rng = np.random.default_rng(4)
  pooled = sm.SchoolMathTask(_config(verifier_workers=2))
  inline = sm.SchoolMathTask(_config())
  try:
    problems = pooled.train_problems(rng, 20)
    texts = [_final(p.answer if i % 2 else sm.wrong_answer(p.answer, rng))
             for i, p in enumerate(problems)]
    texts[0] = _final('x*(x + 2)')  # Wrong (for a polynomial, found wrong by sympy).
    polynomial = next(i for i in range(1, len(problems))
                      if any(c.isalpha() for c in problems[i].answer))
    texts[polynomial] = _final(f'({problems[polynomial].answer}) + 0*z')  # Right, by sympy.
    want = np.asarray([inline.reward(t, p) for t, p in zip(texts, problems)], np.float32)
    np.testing.assert_array_equal(pooled.rewards(texts, problems), want)
    np.testing.assert_array_equal(inline.rewards(texts, problems), want)
    right = [i % 2 == 1 or i == polynomial for i in range(len(problems))]
    np.testing.assert_array_equal(want, right)
    assert pooled.verifier_stats['items'] >= 1 and inline.verifier_stats['items'] == 0
  finally:
    pooled.close()


def test_base_transcripts_do_not_self_correct(task):
  triples = [(p, *ys) for p, ys in task.base_transcripts(np.random.default_rng(0), 300)]
  r1 = np.asarray([task.reward(y1, p) for p, y1, _ in triples])
  r2 = np.asarray([task.reward(y2, p) for p, _, y2 in triples])
  accuracy = 1 - task.config.slip_prob
  # Binomial(300, 0.6): standard deviation 0.028; 4 sigma.
  assert abs(r1.mean() - accuracy) < 0.12 and abs(r2.mean() - accuracy) < 0.12
  # Independent turns: P(wrong -> right) is the base accuracy, not 1.
  assert abs(r2[r1 == 0].mean() - accuracy) < 0.2
  assert all(y.startswith('Final Answer: The final answer is $') for _, y, _ in triples)


def test_corpus(task):
  texts = list(task.corpus(np.random.default_rng(0), 10))
  assert len(texts) == 10
  assert task.correction_instruction in texts
  assert any(t.startswith('Solve the following') for t in texts)
