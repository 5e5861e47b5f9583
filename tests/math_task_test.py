"""The MATH task on tiny hand-written fixtures in both layouts, and through tfds."""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from score_jax.tasks import math as math_task
from score_jax.tasks.base import Problem

DATA = os.path.join(os.path.dirname(__file__), 'data', 'math')
ORIGINAL = os.path.join(DATA, 'original')
JSONL = os.path.join(DATA, 'math500_tiny.jsonl')


def make(**fields) -> math_task.MathTask:
  return math_task.MathTask(ml_collections.ConfigDict(fields))


def test_original_layout_reads_last_boxed_in_sorted_order():
  task = make(train_path=os.path.join(ORIGINAL, 'train'),
              eval_path=os.path.join(ORIGINAL, 'test'))
  train = task.train_split
  # 8.json has no \boxed answer and is skipped; ids sort numerically within a subject.
  assert [p.id for p in train] == ['train/algebra/1.json', 'train/algebra/2.json',
                                   'train/algebra/10.json', 'train/number_theory/3.json',
                                   'train/number_theory/7.json']
  assert [p.answer for p in train] == ['5', '\\frac{1}{2}', '(-1,1)', '101_2', '2']
  assert train[1].meta['level'] == 2 and train[3].meta['subject'] == 'number_theory'
  assert train[1].prompt == 'Solve $2x=1$.'
  assert [p.answer for p in task.eval_problems(3)] == ['100', 'x^2+2x+1', '6']
  assert task.eval_problems(3)[2].meta['subject'] == 'counting_and_probability'


def test_jsonl_layout_and_eval_prefix():
  task = make(eval_path=JSONL)
  got = task.eval_problems(4)
  assert [p.id for p in got] == ['test/prealgebra/1.json', 'test/algebra/9.json',
                                 'test/algebra/4.json', 'test/intermediate_algebra/7.json']
  assert got[1].answer == '\\pm 2' and got[3].meta['level'] == 5
  assert task.eval_problems(2) == got[:2]
  with pytest.raises(ValueError, match='only 4'):
    task.eval_problems(5)


def test_filters_by_level_and_subject():
  task = make(eval_path=JSONL, levels=(1, 2, 3), subjects=('Algebra',))
  assert [p.id for p in task.eval_problems(2)] == ['test/algebra/9.json', 'test/algebra/4.json']
  task = make(train_path=os.path.join(ORIGINAL, 'train'), subjects=('number_theory',),
              levels=(2,))
  assert [p.answer for p in task.train_split] == ['101_2']


def test_train_sampling_uses_rng_and_excludes_eval_problems():
  # Original test split as training data, MATH500 (which contains test/algebra/4) as eval.
  task = make(train_path=os.path.join(ORIGINAL, 'test'), eval_path=JSONL)
  assert {p.answer for p in task.train_split} == {'x^2+2x+1', '6'}
  a = task.train_problems(np.random.default_rng(0), 50)
  b = task.train_problems(np.random.default_rng(0), 50)
  c = task.train_problems(np.random.default_rng(1), 50)
  assert a == b and a != c and len(a) == 50
  assert {p.id for p in a} == {p.id for p in task.train_split}  # both drawn in 50 tries
  eval_texts = {p.prompt for p in task.eval_problems(4)}
  assert not any(p.prompt in eval_texts for p in a)


def test_prompt_instruction_and_rewards():
  task = make(eval_path=JSONL)
  p = task.eval_problems(1)[0]
  prompt = task.prompt(p)
  assert prompt.startswith('You are a math expert.') and p.prompt in prompt
  assert 'Final Answer: The final answer is $answer$. I hope it is correct.' in prompt
  assert task.correction_instruction == (
      'There might be an error in the solution above because of lack of understanding of '
      'the question. Please correct the error, if any, and rewrite the solution. Only output '
      'the final solution! At the end of the Solution, when you give your final answer, '
      'write it in the form "Final Answer: The final answer is $answer$. I hope it is '
      'correct."')
  problems = task.eval_problems(4)
  texts = ['Final Answer: The final answer is $0.75$. I hope it is correct.',
           'Final Answer: The final answer is $2$. I hope it is correct.',  # ref is \pm 2
           'so it is \\boxed{100}.',
           'Final Answer: The final answer is $\\sqrt{8}$. I hope it is correct.']
  r = task.rewards(texts, problems)
  assert r.dtype == np.float32 and r.tolist() == [1.0, 0.0, 1.0, 1.0]
  assert [task.reward(t, q) for t, q in zip(texts, problems)] == r.tolist()


def test_reward_stats_count_refused_hedges_and_unevaluated_answers():
  task = make(eval_path=JSONL)
  problems = task.eval_problems(4)
  stats = task.reward_stats()
  assert stats == {'verifier_timeouts': 0.0, 'verifier_errors': 0.0, 'math_hedged': 0.0,
                   'math_unevaluated': 0.0}
  right = 'Final Answer: The final answer is $0.75$. I hope it is correct.'
  hedge = 'The final answer is $\\frac{3}{4}$ or $\\frac{1}{4}$. I hope it is correct.'
  uneval = 'The final answer is $\\frac{3x}{4x}$. I hope it is correct.'
  r = task.rewards([right, hedge, uneval, hedge], [problems[0]] * 4)
  assert r.tolist() == [1.0, 0.0, 0.0, 0.0]
  task.rewards([hedge], [problems[0]])
  stats = task.reward_stats()
  assert stats['math_hedged'] == 3.0 and stats['math_unevaluated'] == 1.0
  task.close()


def test_corpus_covers_prompts_solutions_and_instruction():
  task = make(train_path=os.path.join(ORIGINAL, 'train'))
  texts = list(task.corpus(np.random.default_rng(0), 10))
  assert len(texts) == 10
  assert task.correction_instruction in texts
  assert any(t.startswith('You are a math expert.') for t in texts)
  assert any('\\boxed' in t for t in texts)
  assert any(t.startswith('Final Answer: The final answer is $') for t in texts)


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope'):
    make(eval_path=str(tmp_path / 'nope.jsonl'))
  with pytest.raises(ValueError, match='unknown MATH format'):
    make(eval_path=JSONL, format='parquet')
  with pytest.raises(ValueError, match='unknown math task fields'):
    make(eval_pth=JSONL)
  with pytest.raises(ValueError, match='levels are 1..5'):
    make(eval_path=JSONL, levels=(6,))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'problem': 'a', 'answer': '1'}) + '\n\n{"problem": "b", oops}\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl:3: malformed JSON'):
    make(eval_path=str(bad)).eval_problems(1)
  nokey = tmp_path / 'nokey.jsonl'
  nokey.write_text(json.dumps({'question': 'a', 'answer': '1'}) + '\n')
  with pytest.raises(ValueError, match=r'nokey\.jsonl:1: expected an object with a string'):
    make(eval_path=str(nokey)).eval_problems(1)
  split = tmp_path / 'train' / 'algebra'
  split.mkdir(parents=True)
  (split / '1.json').write_text('{\n  "problem": "x",\n  "solution": \n}')
  with pytest.raises(ValueError, match=r'1\.json:4: malformed JSON'):
    _ = make(train_path=str(tmp_path / 'train')).train_split
  with pytest.raises(ValueError, match='empty after filtering'):
    make(eval_path=JSONL, subjects=('geometry',)).eval_problems(1)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(ValueError, match='empty'):
    make(eval_path=str(empty)).eval_problems(1)
  with pytest.raises(ValueError, match='needs a file'):
    make(eval_path=os.path.join(ORIGINAL, 'test'), format='jsonl').eval_problems(1)
  with pytest.raises(ValueError, match='no path for the MATH train split'):
    make(eval_path=JSONL).train_problems(np.random.default_rng(0), 1)


def test_tfds_build_and_read_back_without_tensorflow(tmp_path):
  from score_jax.tasks import math_tfds
  data_dir = str(tmp_path / 'tfds')
  math_tfds.build(data_dir, train_path=os.path.join(ORIGINAL, 'train'), eval_path=JSONL)
  assert any(n.endswith('array_record-00000-of-00001') for _, _, names in
             os.walk(data_dir) for n in names)
  direct = make(train_path=os.path.join(ORIGINAL, 'train'), eval_path=JSONL)
  via_tfds = make(format='tfds', tfds_data_dir=data_dir)
  assert via_tfds.eval_problems(4) == direct.eval_problems(4)
  assert via_tfds.train_split == direct.train_split
  # The `auto` format picks tfds when only tfds_data_dir is given.
  assert make(tfds_data_dir=data_dir).eval_problems(1) == direct.eval_problems(1)
  with pytest.raises(FileNotFoundError, match='no score_math dataset'):
    make(format='tfds', tfds_data_dir=str(tmp_path)).eval_problems(1)


def test_tfds_auto_format_drops_train_problems_that_are_eval_problems(tmp_path):
  from score_jax.tasks import math_tfds
  train = make(train_path=os.path.join(ORIGINAL, 'train')).train_split
  overlap = tmp_path / 'eval.jsonl'  # an eval set holding one training problem
  overlap.write_text(json.dumps(dict(problem=train[0].prompt, answer=train[0].answer)) + '\n')
  data_dir = str(tmp_path / 'tfds')
  math_tfds.build(data_dir, train_path=os.path.join(ORIGINAL, 'train'), eval_path=str(overlap))
  auto = make(tfds_data_dir=data_dir)  # format 'auto' resolves to tfds
  assert [p.prompt for p in auto.train_split] == [p.prompt for p in train[1:]]


def test_problem_records_are_plain_problems():
  p = make(eval_path=JSONL).eval_problems(1)[0]
  assert isinstance(p, Problem) and set(p.meta) == {'level', 'subject', 'solution'}


def test_answer_key_votes_equal_forms_together():
  task = math_task.MathTask.__new__(math_task.MathTask)  # answer_key reads no data
  say = 'Final Answer: The final answer is ${}$. I hope it is correct.'.format
  assert task.answer_key(say('\\dfrac{1}{2}')) == task.answer_key(say('\\frac12'))
  assert task.answer_key(say('3')) != task.answer_key(say('4'))
  assert task.answer_key('no final answer here') is None
