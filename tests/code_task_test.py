"""Code tasks through the real sandbox: MBPP fixture, all of HumanEval, MBPP-R, extraction."""
import os

import ml_collections
import numpy as np
import pytest

from score_jax.tasks import code

DATA = os.path.join(os.path.dirname(__file__), 'data')
MBPP = os.path.join(DATA, 'mbpp_tiny.jsonl')


def mbpp_task(**fields) -> code.MBPPTask:
  return code.MBPPTask(ml_collections.ConfigDict(dict(path=MBPP, wall_s=5.0, **fields)))


# -- extraction ----------------------------------------------------------------------------

PROGRAM = 'def f(x):\n    return x + 1'


@pytest.mark.parametrize('response', [
    f'{PROGRAM}\n[DONE]\nmore text [DONE]',
    f'[BEGIN]\n{PROGRAM}\n[DONE]',
    f'Here is the fix:\n```python\n{PROGRAM}\n```\nIt adds one.',
    f'```\n{PROGRAM}\n```',
    # Quoted old code first, corrected program last, then a usage block without a def.
    f'Old:\n```python\ndef f(x):\n    return x\n```\nNew:\n```python\n{PROGRAM}\n```\n'
    'Usage:\n```python\nprint(f(1))\n```',
    f'Sure! Here it is.\n\n{PROGRAM}\n\nThis works because it adds one.',
    f'```python\n{PROGRAM}\n',  # truncated: no closing fence
])
def test_extract_program(response):
  assert code.extract_program(response) == PROGRAM


def test_extract_program_of_prose_is_empty():
  assert code.extract_program('I do not know.') == ''


# -- MBPP ----------------------------------------------------------------------------------


def test_mbpp_splits_prompt_and_instruction():
  task = mbpp_task()
  assert [p.meta['task_id'] for p in task.eval_problems(3)] == [11, 12, 13]
  train = task.train_problems(np.random.default_rng(0), 20)
  assert {p.meta['task_id'] for p in train} <= {601, 602}
  assert mbpp_task(eval_split='validation').eval_problems(1)[0].meta['task_id'] == 511
  prompt = task.prompt(task.eval_problems(1)[0])
  assert prompt.startswith('You are an expert Python programmer, and here is your task: '
                           'Write a function to find the shared elements')
  assert prompt.count('[BEGIN]') == 4 and prompt.count('[DONE]') == 3
  assert prompt.endswith('Your code should pass these tests:\n\nassert remove_Occ("hello",'
                         '"l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
                         'assert remove_Occ("abcabca","a") == "bcabc"\n[BEGIN]\n')
  assert task.correction_instruction == (
      'There might be an error in the code above because of lack of understanding of the '
      'question. Please correct the error, if any, and rewrite the solution. Only output '
      'the final correct Python program!')
  with pytest.raises(ValueError, match='at most|has 3'):
    task.eval_problems(4)


def test_mbpp_missing_fewshot_ids_is_a_clear_error(tmp_path):
  lines = [l for l in open(MBPP) if '"task_id": 3,' not in l]
  path = tmp_path / 'no_shots.jsonl'
  path.write_text(''.join(lines))
  with pytest.raises(ValueError, match=r'\[3\]'):
    code.MBPPTask(ml_collections.ConfigDict(dict(path=str(path))))
  task = code.MBPPTask(ml_collections.ConfigDict(dict(path=str(path), fewshot_path=MBPP)))
  assert len(task.fewshot) == 3
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    code.MBPPTask(ml_collections.ConfigDict(dict(path='nope.jsonl')))


def test_mbpp_rewards_reference_right_wrong_and_formats():
  task = mbpp_task()
  problems = task.eval_problems(3) + task.train_problems(np.random.default_rng(1), 2)
  refs = [p.answer + '\n[DONE]' for p in problems]  # the few-shot completion format
  np.testing.assert_array_equal(task.rewards(refs, problems), np.ones(5))
  fenced = [f'Here you go:\n```python\n{p.answer}\n```' for p in problems]
  np.testing.assert_array_equal(task.rewards(fenced, problems), np.ones(5))
  wrong = ['def remove_Occ(s, ch):\n    return s.replace(ch, "")\n[DONE]'] * 5
  np.testing.assert_array_equal(task.rewards(wrong, problems), np.zeros(5))
  cheat = 'import sys\nsys.exit(0)\n[DONE]'
  assert task.reward(cheat, problems[0]) == 0.0
  assert task.reward(refs[0], problems[0]) == 1.0


def test_mbpp_setup_code_runs_before_the_asserts():
  task = mbpp_task()
  circle = task.eval_problems(3)[2]
  assert 'PI = 3.14' in circle.meta['tests']
  assert task.reward('def circle_area(r):\n    return PI * r * r\n[DONE]', circle) == 1.0


def test_mbpp_r_scores_only_the_correction():
  repair = code.MBPPRepair(mbpp_task(), os.path.join(DATA, 'mbpp_r_tiny.jsonl'))
  assert [e.problem.meta['task_id'] for e in repair.episodes] == [11, 12, 601]
  ep = repair.episodes[0]
  assert ep.prompt.endswith('[BEGIN]\n') and ep.instruction == code.CORRECTION_INSTRUCTION
  np.testing.assert_array_equal(repair.first_attempt_rewards(), [0, 0, 1])
  fixes = [f'```python\n{e.problem.answer}\n```' for e in repair.episodes]
  np.testing.assert_array_equal(repair.score(fixes), [1, 1, 1])
  np.testing.assert_array_equal(repair.score(['', 'x = 1', fixes[2]]), [0, 0, 1])


# -- HumanEval -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def humaneval():
  return code.HumanEvalTask(ml_collections.ConfigDict(dict(train_path=MBPP, wall_s=10.0)))


def test_humaneval_all_canonical_solutions_pass(humaneval):
  problems = humaneval.eval_problems(164)
  assert len({p.id for p in problems}) == 164
  rewards = humaneval.rewards([p.answer for p in problems], problems)
  failed = [p.id for p, r in zip(problems, rewards) if r != 1.0]
  assert failed == []


def test_humaneval_bare_prompts_and_pass_bodies_get_zero(humaneval):
  # All 164 bare prompts and all 164 `pass` bodies (~5 s on a quiet 2-core machine).
  problems = humaneval.eval_problems(164)
  rewards = humaneval.rewards([''] * 164 + ['    pass\n'] * 164, problems + problems)
  assert len(rewards) == 328
  assert rewards.sum() == 0.0, [p.id for p, r in zip(problems + problems, rewards) if r]


def test_humaneval_full_program_response_and_training_side(humaneval):
  problems = humaneval.eval_problems(164)[::20]
  full = [f'Corrected:\n```python\n{p.prompt}{p.answer}\n```\nDone.' for p in problems]
  np.testing.assert_array_equal(humaneval.rewards(full, problems), np.ones(len(problems)))
  assert humaneval.prompt(problems[0]) == problems[0].prompt
  train = humaneval.train_problems(np.random.default_rng(0), 4)
  assert all(p.meta['source'] == 'mbpp' for p in train)
  assert humaneval.prompt(train[0]).endswith('[BEGIN]\n')
  assert humaneval.reward(train[0].answer + '\n[DONE]', train[0]) == 1.0


@pytest.mark.skipif(not os.environ.get('SCORE_MBPP_JSONL'),
                    reason='set SCORE_MBPP_JSONL to a full mbpp.jsonl (none ships here)')
def test_full_mbpp_references_keep_their_verdict():
  """Every reference solution of a full MBPP file that passes its tests under plain Python
  (trusted dataset code, run here in a subprocess) also passes in the sandbox.

    SCORE_MBPP_JSONL=/path/to/mbpp.jsonl python -m pytest tests/code_task_test.py -k full_mbpp
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  task = code.MBPPTask(ml_collections.ConfigDict(dict(path=os.environ['SCORE_MBPP_JSONL'],
                                                      wall_s=20.0, cpu_s=10.0)))
  problems = [task.problems[i] for i in sorted(task.problems)]
  rewards = task.rewards([p.answer + '\n[DONE]' for p in problems], problems)
  changed = []
  for p, r in zip(problems, rewards):
    if r != 1.0:
      program, tests = task.program_and_tests(p.answer + '\n[DONE]', p)
      plain = subprocess.run([sys.executable, '-I', '-c', program + '\n' + tests],
                             capture_output=True, timeout=60)
      if plain.returncode == 0:
        changed.append(p.id)
  print(f'{int(rewards.sum())}/{len(problems)} references pass in the sandbox; '
        f'verdict changed: {changed}; counters: {task.reward_stats()}')
  assert changed == []
