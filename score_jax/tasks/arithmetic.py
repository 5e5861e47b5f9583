"""Embedded, verifiable task: multi-digit addition with a written check.

Built so that self-correction can emerge from RL on a tiny model trained from scratch:

  turn-1 prompt   `Add 347+586.`
  response        `Answer 823. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.`
  instruction     `There might be an error in the answer above. Check it and correct it if needed.`

The response states its answer first and then works the sum column by column from the
least significant digit (`+1` marks a carry-in). The reward reads only the claimed answer.

The base model is trained (supervised) on a simulated student whose written check is
always right but whose claimed answer, on problems with at least `slip_min_carries`
carries, is the carry-free digit-wise sum with probability `slip_prob`. Its mistakes are
therefore visible in its own work (`so 933` disagrees with `Answer 823`) and can be fixed
by reading that work -- the premise of SCoRe. Turn 2 of a base transcript is an
independent fresh attempt, as for a real base model, so the base does not self-correct.

Expected base accuracy with the defaults (num_digits=3, slip_prob=0.7, slip_min_carries=2).
By enumeration of all 900*900 = 810,000 pairs of 3-digit numbers, the number of carries
(a carry out of the top column counts) is 0: 108,900; 1: 278,325; 2: 291,600; 3: 131,175,
so P(>= 2 carries) = 422,775 / 810,000 = 1879/3600 = 0.52194. A slip is always wrong
(with any carry the carry-free sum is smaller than a+b). Hence:
  - sampling the student (temperature 1): Acc = 1 - 0.7 * 1879/3600 = 22847/36000
    = 0.63464 at each turn; the turns are independent, so Δ ≈ 0 and
    Δi→c ≈ Δc→i ≈ 0.63464 * 0.36536 ≈ 0.2319;
  - greedy decoding of a model that has learned the student exactly: on >= 2-carry
    problems the slip is the more likely answer (0.7 > 0.5), so Acc = 1721/3600 = 0.47806
    at both turns, with turn 2 repeating turn 1 (Δ = 0, edit ratio 0).
The held-out split is a hash-selected ~10% of pairs, so its rates match to within ~0.5%.
A model that always reads its own check would score 1.0.

The CPU demo (configs/demo.py) uses num_digits=2, where 2,385 of the 8,100 pairs have
two carries (53/180), so greedy decoding of a perfectly learned student scores
127/180 = 70.6%; the tiny base model's own arithmetic errors move it from there.
"""
from __future__ import annotations

import functools
import re
from typing import Iterator

import ml_collections
import numpy as np

from score_jax.tasks.base import Problem, Task, merge_config

CORRECTION_INSTRUCTION = (
    'There might be an error in the answer above. Check it and correct it if needed.')

_ANSWER_RE = re.compile(r'\s*Answer (\d+)(?!\w)')
_EVAL_SEED = 20240917  # Fixed: the held-out list must not depend on the run's seed.
_MAX_ENUMERATED_PAIRS = 4_000_000  # Above this, held-out pairs are sampled, not enumerated.


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='arithmetic',
      num_digits=3,         # Both operands have exactly this many digits.
      slip_prob=0.7,        # P(student claims the carry-free sum) on hard problems.
      slip_min_carries=2,   # A problem is hard when it has at least this many carries.
      eval_fraction=0.1,    # Share of (a, b) pairs held out for evaluation.
  ))


# ---------------------------------------------------------------------------------------
# The arithmetic and the simulated student.


def _columns(a: int, b: int) -> list[tuple[int, int, int]]:
  """(x, y, carry_in) for each column, least significant first."""
  width = max(len(str(a)), len(str(b)))
  cols, carry = [], 0
  for i in range(width):
    x, y = a // 10**i % 10, b // 10**i % 10
    cols.append((x, y, carry))
    carry = int(x + y + carry >= 10)
  return cols


def count_carries(a: int, b: int) -> int:
  """Columns of a+b that carry (including a carry out of the top column)."""
  return sum(x + y + c >= 10 for x, y, c in _columns(a, b))


def carry_free_sum(a: int, b: int) -> int:
  """The classic slip: each column (x+y) % 10, carries dropped (347+586 -> 823)."""
  return sum((x + y) % 10 * 10**i for i, (x, y, _) in enumerate(_columns(a, b)))


def check_text(a: int, b: int) -> str:
  """The written column work, always correct: `7+6=13, 4+8+1=13, 3+5+1=9 so 933`."""
  steps = [f'{x}+{y}{"+1" if c else ""}={x + y + c}' for x, y, c in _columns(a, b)]
  return f'{", ".join(steps)} so {a + b}'


def format_response(a: int, b: int, claimed: int) -> str:
  return f'Answer {claimed}. Check {check_text(a, b)}.'


def correct_response(a: int, b: int) -> str:
  """A self-consistent right answer."""
  return format_response(a, b, a + b)


def student_response(a: int, b: int, rng: np.random.Generator, slip_prob: float = 0.7,
                     slip_min_carries: int = 2) -> str:
  """One attempt of the simulated student: right work, sometimes a slipped answer."""
  slip = count_carries(a, b) >= slip_min_carries and rng.random() < slip_prob
  return format_response(a, b, carry_free_sum(a, b) if slip else a + b)


def parse_answer(response_text: str) -> int | None:
  """The claimed answer: the whole number right after a leading `Answer `, else None."""
  m = _ANSWER_RE.match(response_text)
  return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------
# Held-out split.


def pair_hash(a, b) -> np.ndarray:
  """Deterministic 64-bit hash of (a, b) (splitmix64 finaliser); ints or int arrays.

  Python's hash() is salted per process, so it cannot define a stable split.
  """
  a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
  with np.errstate(over='ignore'):
    z = (a << np.uint64(32)) | b
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class ArithmeticTask(Task):
  """`a + b` with `num_digits`-digit operands; see the module docstring."""

  name = 'arithmetic'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    cfg = merge_config(default_config(), config)
    if not 1 <= cfg.num_digits <= 9:
      raise ValueError(f'num_digits must be in [1, 9], got {cfg.num_digits}')
    if not 0.0 < cfg.eval_fraction <= 0.5:
      raise ValueError(f'eval_fraction must be in (0, 0.5], got {cfg.eval_fraction}')
    if not 0.0 <= cfg.slip_prob <= 1.0:
      raise ValueError(f'slip_prob must be in [0, 1], got {cfg.slip_prob}')
    self.config = cfg
    self.low, self.high = 10**(cfg.num_digits - 1), 10**cfg.num_digits  # [low, high)
    self.eval_modulus = round(1 / cfg.eval_fraction)

  # -- problems ---------------------------------------------------------------------------

  def is_eval(self, a, b):
    return pair_hash(a, b) % np.uint64(self.eval_modulus) == 0

  def make_problem(self, a: int, b: int) -> Problem:
    a, b = int(a), int(b)
    return Problem(id=f'{a}+{b}', prompt=f'{a}+{b}', answer=str(a + b),
                   meta={'a': a, 'b': b, 'carries': count_carries(a, b)})

  def _draw_pairs(self, rng: np.random.Generator, n: int, held_out: bool):
    """`n` pairs (a_n, b_n) from the train or held-out side of the split, by rejection."""
    a_out, b_out, have = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
    batch = int(n * 1.25 * (self.eval_modulus if held_out else 1)) + 64
    while have < n:
      a = rng.integers(self.low, self.high, batch)
      b = rng.integers(self.low, self.high, batch)
      keep = self.is_eval(a, b) == held_out
      a_out.append(a[keep])
      b_out.append(b[keep])
      have += int(keep.sum())
    return np.concatenate(a_out)[:n], np.concatenate(b_out)[:n]

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    a, b = self._draw_pairs(rng, n, held_out=False)
    return [self.make_problem(x, y) for x, y in zip(a, b)]

  @functools.cached_property
  def _eval_pairs(self) -> np.ndarray | None:
    """All held-out pairs in a fixed shuffled order, when there are few enough to list."""
    side = np.arange(self.low, self.high)
    if side.size**2 > _MAX_ENUMERATED_PAIRS:
      return None
    a, b = (x.ravel() for x in np.meshgrid(side, side, indexing='ij'))
    keep = self.is_eval(a, b)
    pairs = np.stack([a[keep], b[keep]], axis=1)
    return np.random.default_rng(_EVAL_SEED).permutation(pairs)

  def eval_problems(self, n: int) -> list[Problem]:
    """The first `n` held-out problems of a fixed order (so a prefix of any longer list)."""
    pairs = self._eval_pairs
    if pairs is None:
      # Too many pairs to list: sample in fixed-size batches from a fixed seed (so the
      # order does not depend on n), dropping repeats.
      rng, seen, out = np.random.default_rng(_EVAL_SEED), set(), []
      while len(out) < n:
        for x, y in zip(*self._draw_pairs(rng, 4096, held_out=True)):
          if (x, y) not in seen:
            seen.add((x, y))
            out.append((x, y))
      pairs = out
    elif n > len(pairs):
      raise ValueError(f'asked for {n} eval problems but the held-out split of '
                       f'{self.config.num_digits}-digit addition has only {len(pairs)} '
                       f'(eval_fraction={self.config.eval_fraction})')
    return [self.make_problem(x, y) for x, y in pairs[:n]]

  # -- text and reward ----------------------------------------------------------------------

  def prompt(self, problem: Problem) -> str:
    return f'Add {problem.prompt}.'

  def reward(self, response_text: str, problem: Problem) -> float:
    claimed = parse_answer(response_text)
    return float(claimed is not None and claimed == int(problem.answer))

  def student(self, problem: Problem, rng: np.random.Generator) -> str:
    return student_response(problem.meta['a'], problem.meta['b'], rng,
                            self.config.slip_prob, self.config.slip_min_carries)

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """Prompts, student and correct responses, and the instruction, in rotation."""
    for i, p in enumerate(self.train_problems(rng, (n + 3) // 4)):
      a, b = p.meta['a'], p.meta['b']
      texts = (self.prompt(p), self.student(p, rng), correct_response(a, b),
               self.correction_instruction)
      yield from texts[:n - 4 * i]
