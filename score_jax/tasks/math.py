"""MATH (Hendrycks et al., 2021) and its subsets (MATH500) as a SCoRe task.

Nothing is downloaded: the user points the config at local files in one of three layouts.

  math_json  the original release: `<split dir>/<subject>/<id>.json`, each with `problem`,
             `level` ("Level 3"), `type` ("Counting & Probability"), `solution`; the
             reference answer is the last `\\boxed{}` of the solution.
  jsonl      one problem per line (MATH500: `problem`, `answer`, `subject`, `level`,
             `unique_id`; a line with `solution` but no `answer` uses its last box).
  tfds       an ArrayRecord dataset written by `score_jax/tasks/math_tfds.py` from either
             of the above (`tfds_data_dir`; split `train` for training, `test` for eval).

`format='auto'` picks math_json for a directory, jsonl for a file, tfds when only
`tfds_data_dir` is set. `levels` / `subjects` filter both splits (subjects by snake-case
name, e.g. `number_theory`, `counting_and_probability`). The order of the eval split is
the order of its source (sorted paths; file lines), so `eval_problems(n)` is a prefix.

Prompts are SCORE.md's: turn 1 asks for a step-by-step solution ending in
`Final Answer: The final answer is $answer$. I hope it is correct.`; the correction
instruction is the paper's string verbatim. The reward is `math_grader.grade`: the
response must commit to one answer equal to the reference.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
from typing import Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from score_jax.tasks.rewards import math_extract, math_grader, math_normalize
from score_jax.tasks.base import Problem, Task, merge_config
from score_jax.tasks.rewards.verifiers import PooledGrading

PROMPT_TEMPLATE = (
    'You are a math expert. Solve the following problem step by step. At the end of the '
    'Solution, when you give your final answer, write it in the form "Final Answer: The '
    'final answer is $answer$. I hope it is correct."\n\nProblem:\n{problem}\n\nSolution:')
CORRECTION_INSTRUCTION = (
    'There might be an error in the solution above because of lack of understanding of the '
    'question. Please correct the error, if any, and rewrite the solution. Only output the '
    'final solution! At the end of the Solution, when you give your final answer, write it '
    'in the form "Final Answer: The final answer is $answer$. I hope it is correct."')
FINAL_ANSWER_FORM = 'Final Answer: The final answer is ${answer}$. I hope it is correct.'
FORMATS = ('auto', 'math_json', 'jsonl', 'tfds')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='math',
      train_path='',      # split directory (math_json) or .jsonl file; '' = none
      eval_path='',       # e.g. MATH/test or math500.jsonl
      format='auto',      # one of FORMATS
      tfds_data_dir='',   # where math_tfds wrote the ArrayRecord dataset
      levels=(),          # keep only these levels (1..5); () = all
      subjects=(),        # keep only these subjects (snake case); () = all
      verifier_workers=2,       # grading (sympy) in worker processes; 0 = in-process
      verifier_timeout_s=10.0,  # per answer; a late answer scores 0
  ))


def subject_key(name: str) -> str:
  """`Counting & Probability` / `counting_and_probability` -> `counting_and_probability`."""
  return re.sub(r'[^a-z0-9]+', '_', name.lower().replace('&', 'and')).strip('_')


def _level(value) -> int | None:
  """`Level 3`, `3`, 3 -> 3; `Level ?` (a few MATH problems) -> None."""
  m = re.search(r'\d+', str(value)) if value is not None else None
  return int(m.group()) if m else None


def _problem(record: dict, pid: str, where: str) -> Problem | None:
  """A Problem from one source record, or None if it has no reference answer."""
  if not isinstance(record, dict) or not isinstance(record.get('problem'), str):
    raise ValueError(f'{where}: expected an object with a string "problem", got '
                     f'{str(record)[:80]!r}')
  solution = record.get('solution')
  answer = record.get('answer')
  if answer is None and isinstance(solution, str):
    answer = math_extract.last_boxed(solution)
  if answer is None or not str(answer).strip():
    return None
  subject = record.get('subject') or record.get('type') or ''
  return Problem(id=str(record.get('unique_id') or pid), prompt=record['problem'],
                 answer=str(answer).strip(),
                 meta={'level': _level(record.get('level')), 'subject': subject_key(subject),
                       'solution': solution if isinstance(solution, str) else ''})


def _numeric_first(name: str):
  stem = os.path.splitext(name)[0]
  return (0, int(stem), '') if stem.isdigit() else (1, 0, stem)


def load_math_json(split_dir: str) -> list[Problem]:
  """The original release's `<split_dir>/<subject>/<id>.json` files, in sorted order."""
  def records():
    for subject in sorted(os.listdir(split_dir)):
      sub_dir = os.path.join(split_dir, subject)
      if not os.path.isdir(sub_dir):
        continue
      for name in sorted((n for n in os.listdir(sub_dir) if n.endswith('.json')),
                         key=_numeric_first):
        path = os.path.join(sub_dir, name)
        with open(path, encoding='utf-8') as f:
          try:
            record = json.load(f)
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{e.lineno}: malformed JSON ({e.msg})') from None
        record.setdefault('type', subject)
        yield record, f'{os.path.basename(split_dir)}/{subject}/{name}', path
  return _collect(records())


def load_jsonl(path: str) -> list[Problem]:
  """One JSON object per line (MATH500 layout); blank lines are skipped."""
  def records():
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{path}:{lineno}'
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{where}: malformed JSON ({e.msg})') from None
        yield record, f'{os.path.basename(path)}:{lineno}', where
  return _collect(records())


def _collect(records) -> list[Problem]:
  """Problems from (record, id, where) triples; those without a reference answer (no
  \\boxed{} in the solution) are skipped with one warning naming a few."""
  problems, unboxed = [], []
  for record, pid, where in records:
    p = _problem(record, pid, where)
    if p:
      problems.append(p)
    else:
      unboxed.append(where)
  if unboxed:
    logging.warning('skipped %d MATH problems without a reference answer (no \\boxed{} '
                    'in the solution), e.g. %s', len(unboxed), ', '.join(unboxed[:3]))
  return problems


def resolve_format(fmt: str, path: str, tfds_data_dir: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f'unknown MATH format {fmt!r}; known: {", ".join(FORMATS)}')
  if fmt != 'auto':
    return fmt
  if path:
    return 'math_json' if os.path.isdir(path) else 'jsonl'
  return 'tfds' if tfds_data_dir else 'auto'


def load_split(fmt: str, path: str, tfds_data_dir: str, split: str) -> list[Problem]:
  """All problems of one split in source order; `split` is `train` or `test` (tfds)."""
  fmt = resolve_format(fmt, path, tfds_data_dir)
  if fmt == 'tfds':
    from score_jax.tasks import math_tfds  # pylint: disable=import-outside-toplevel
    return math_tfds.read_split(tfds_data_dir, split)
  if not path:
    raise ValueError(f'no path for the MATH {split} split (set train_path / eval_path, or '
                     f'tfds_data_dir with format="tfds")')
  if not os.path.exists(path):
    raise FileNotFoundError(f'MATH {split} path {path!r} does not exist')
  if fmt == 'math_json':
    if not os.path.isdir(path):
      raise ValueError(f'format "math_json" needs a split directory, got the file {path!r}')
    return load_math_json(path)
  if os.path.isdir(path):
    raise ValueError(f'format "jsonl" needs a file, got the directory {path!r}')
  return load_jsonl(path)


def keep(problems: Iterable[Problem], levels, subjects) -> list[Problem]:
  levels = {int(x) for x in levels}
  subjects = {subject_key(s) for s in subjects}
  return [p for p in problems
          if (not levels or p.meta['level'] in levels)
          and (not subjects or p.meta['subject'] in subjects)]


def _text_key(text: str) -> str:
  return ' '.join(text.split())


class MathTask(PooledGrading, Task):
  """MATH from local files; see the module docstring."""

  name = 'math'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    cfg = merge_config(default_config(), config)
    resolve_format(cfg.format, '', '')  # rejects an unknown format now, not at first use
    for field in ('train_path', 'eval_path', 'tfds_data_dir'):
      if cfg[field] and not os.path.exists(cfg[field]):
        raise FileNotFoundError(f'math task {field}={cfg[field]!r} does not exist')
    bad_levels = [x for x in cfg.levels if int(x) not in range(1, 6)]
    if bad_levels:
      raise ValueError(f'MATH levels are 1..5, got {bad_levels}')
    self.config = cfg
    self._refused = collections.Counter()  # verdicts 'hedged' / 'unevaluated', cumulative

  def _split(self, path: str, split: str) -> list[Problem]:
    problems = load_split(self.config.format, path, self.config.tfds_data_dir, split)
    kept = keep(problems, self.config.levels, self.config.subjects)
    if not kept:
      raise ValueError(f'the MATH {split} split ({path or self.config.tfds_data_dir}) is '
                       f'empty after filtering: {len(problems)} problems, levels='
                       f'{tuple(self.config.levels)}, subjects={tuple(self.config.subjects)}')
    return kept

  def _has_split(self, path: str) -> bool:
    """A split is given by its path, or by the tfds dataset (also when `format` is auto)."""
    return bool(path) or resolve_format(self.config.format, path,
                                        self.config.tfds_data_dir) == 'tfds'

  @functools.cached_property
  def eval_split(self) -> list[Problem]:
    return self._split(self.config.eval_path, 'test')

  @functools.cached_property
  def train_split(self) -> list[Problem]:
    """Training problems minus any whose text is also an eval problem (MATH500 overlap)."""
    train = self._split(self.config.train_path, 'train')
    if not self._has_split(self.config.eval_path):
      return train
    held_out = {_text_key(p.prompt) for p in self.eval_split}
    kept = [p for p in train if _text_key(p.prompt) not in held_out]
    if len(kept) < len(train):
      logging.info('dropped %d training problems that are also eval problems',
                   len(train) - len(kept))
    if not kept:
      raise ValueError('every MATH training problem is also an eval problem')
    return kept

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    split = self.train_split
    return [split[i] for i in rng.integers(0, len(split), n)]

  def eval_problems(self, n: int) -> list[Problem]:
    split = self.eval_split
    if n > len(split):
      raise ValueError(f'asked for {n} eval problems but the MATH eval split has only '
                       f'{len(split)}')
    return split[:n]

  def prompt(self, problem: Problem) -> str:
    return PROMPT_TEMPLATE.format(problem=problem.prompt)

  def reward(self, response_text: str, problem: Problem) -> float:
    return math_grader.grade(response_text, problem.answer)

  def answer_key(self, response_text: str) -> str | None:
    """The final answer, normalised and squashed: `\\dfrac{1}{2}` and `\\frac12` vote
    together (answers equal only after simplification vote apart)."""
    answer = math_extract.extract_answer(response_text)
    if answer is None:
      return None
    value, unit = math_normalize.normalize(answer)
    return math_normalize.squash(value)

  def rewards(self, response_texts: Sequence[str], problems: Sequence[Problem]) -> np.ndarray:
    """float32 [n]: `math_grader` verdicts in the verifier pool, each answer under
    `verifier_timeout_s` (sympy can take unbounded time on hostile input); refused hedges
    and unevaluated answers are counted for `reward_stats`."""
    if len(response_texts) != len(problems):
      raise ValueError(f'{len(response_texts)} responses for {len(problems)} problems')
    codes = self.pooled(math_grader.verdict_code,
                        [(t, p.answer) for t, p in zip(response_texts, problems)])
    for name in ('hedged', 'unevaluated'):
      self._refused[name] += int(np.sum(codes == math_grader.VERDICTS.index(name)))
    return (codes == math_grader.VERDICTS.index('right')).astype(np.float32)

  def reward_stats(self) -> dict[str, float]:
    return {**super().reward_stats(), 'math_hedged': float(self._refused['hedged']),
            'math_unevaluated': float(self._refused['unevaluated'])}

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """Prompts, reference solutions, final-answer lines and the instruction, in rotation."""
    source = self.train_split if self._has_split(self.config.train_path) else self.eval_split
    texts = []
    for p in (source[i] for i in rng.integers(0, len(source), (n + 3) // 4)):
      texts += [self.prompt(p), p.meta['solution'] or p.answer,
                FINAL_ANSWER_FORM.format(answer=p.answer),
                self.correction_instruction]
    yield from texts[:n]
