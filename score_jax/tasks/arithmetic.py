"""Embedded, verifiable task: multi-digit addition with a written check.

Built so that self-correction can emerge from RL on a tiny model trained from scratch:

  turn-1 prompt   `Add 347+586.`
  response        `Answer 823. Check 7+6=13, 4+8+1=13, 3+5+1=9 so 933.`
  instruction     `There might be an error in the answer above. Check it and correct it if needed.`

The response states its answer first and then works the sum column by column from the
least significant digit (`+1` marks a carry-in). The reward reads only the claimed answer.
With more operands (`num_operands`) a carry can exceed 1:
`Add 37+25+49.` -> `Answer 111. Check 7+5+9=21, 3+2+4+2=11 so 111.`

The base model is trained (supervised) on a simulated student whose written check is
always right but whose claimed answer, on problems with at least `slip_min_carries`
carries, is the carry-free digit-wise sum with probability `slip_prob`. Its mistakes are
therefore visible in its own work (`so 933` disagrees with `Answer 823`) and can be fixed
by reading that work -- the premise of SCoRe. Turn 2 of a base transcript is an
independent fresh attempt, as for a real base model, so the base does not self-correct.

The slips are also what make the check worth reading: a check that sometimes disagrees
with the answer must be computed from the operands. Without slips (slip_prob=0, tried
with two- and three-operand sums) the demo-sized model learns to write a check that
agrees with whatever it answered, bending digit sums to fit (`Answer 130. Check 3+8=10,
7+5+1=13 so 130.` for 73+58), and turn 2 has nothing to read.

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

A pretrained chat model writes its own format (`37 + 67 = 104`, then often a blank line
and chatter with other numbers in it), so `answer_format='first_line'` rewards the last
integer of the response's first non-empty line instead of a leading `Answer N`, and
`prompt_template` words the question for it (configs/smollm2.py).

The CPU demo (configs/demo.py; values and why in score_jax/config_defaults.py) uses
num_digits=2 and slip_prob=0.9. 2,385 of the 8,100 pairs have two carries (53/180), so
sampling the student gives Acc = 1 - 0.9 * 53/180 = 73.5% and greedy decoding of a
perfectly learned student 127/180 = 70.6%. The demo's base model scores 69.8-70.7%
greedily (three seeds).
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
_INTEGER_RE = re.compile(r'(?<![\w.])-?\d+(?![\w.]\d)')  # not inside 1.5, x2 or 1e3
_EVAL_SEED = 20240917  # Fixed: the held-out list must not depend on the run's seed.
_MAX_ENUMERATED = 4_000_000  # Above this, held-out tuples are sampled, not enumerated.


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='arithmetic',
      num_digits=3,         # Every operand has exactly this many digits.
      num_operands=2,       # Numbers added.
      slip_prob=0.7,        # P(student claims the carry-free sum) on hard problems.
      slip_min_carries=2,   # A problem is hard when it has at least this many carries.
      # 'right': a slipped answer comes with a right check, whose total shows the right sum
      # (correcting = reading it); 'consistent': the check drops the carries too, so it agrees
      # with the slip and the right sum is written nowhere (correcting = recomputing).
      slip_check='right',
      eval_fraction=0.1,    # Share of operand tuples held out for evaluation.
      prompt_template='Add {problem}.',  # {problem}: the operands joined by '+'
      # 'answer_first': the integer right after a leading `Answer ` (the student's form);
      # 'first_line': the last integer of the first non-empty line (pretrained chat models).
      answer_format='answer_first',
  ))


# ---------------------------------------------------------------------------------------
# The arithmetic and the simulated student. Functions take the operands as *xs (two or more).


def _columns(*xs: int) -> list[tuple[tuple[int, ...], int]]:
  """(digits of the column, carry_in) for each column, least significant first."""
  width = max(len(str(x)) for x in xs)
  cols, carry = [], 0
  for i in range(width):
    digits = tuple(x // 10**i % 10 for x in xs)
    cols.append((digits, carry))
    carry = (sum(digits) + carry) // 10
  return cols


def count_carries(*xs: int) -> int:
  """Columns of the sum that carry (including a carry out of the top column)."""
  return sum(sum(d) + c >= 10 for d, c in _columns(*xs))


def carry_free_sum(*xs: int) -> int:
  """The classic slip: each column's digit sum % 10, carries dropped (347+586 -> 823)."""
  return sum(sum(d) % 10 * 10**i for i, (d, _) in enumerate(_columns(*xs)))


def check_text(*xs: int, carries: bool = True) -> str:
  """The written column work: `7+6=13, 4+8+1=13, 3+5+1=9 so 933` (with three operands a
  carry can be 2: `7+5+9=21, 3+2+4+2=11 so 111`); without `carries`, the slip written
  out: every carry dropped, `7+6=13, 4+8=12, 3+5=8 so 823` (= carry_free_sum)."""
  cols = _columns(*xs)
  steps = [f'{"+".join(map(str, d))}{f"+{c}" if c and carries else ""}={sum(d) + c * carries}'
           for d, c in cols]
  total = sum(xs) if carries else carry_free_sum(*xs)
  return f'{", ".join(steps)} so {total}'


def format_response(xs, claimed: int, carries: bool = True) -> str:
  return f'Answer {claimed}. Check {check_text(*xs, carries=carries)}.'


def correct_response(*xs: int) -> str:
  """A self-consistent right answer."""
  return format_response(xs, sum(xs))


def student_response(xs, rng: np.random.Generator, slip_prob: float = 0.7,
                     slip_min_carries: int = 2, slip_check: str = 'right') -> str:
  """One attempt of the simulated student: right work, sometimes a slipped answer, whose
  check is right (`slip_check='right'`) or drops the carries as the answer did
  ('consistent')."""
  slip = count_carries(*xs) >= slip_min_carries and rng.random() < slip_prob
  if not slip:
    return format_response(xs, sum(xs))
  return format_response(xs, carry_free_sum(*xs), carries=slip_check == 'right')


def parse_answer(response_text: str) -> int | None:
  """The claimed answer: the whole number right after a leading `Answer `, else None."""
  m = _ANSWER_RE.match(response_text)
  return int(m.group(1)) if m else None


def parse_first_line(response_text: str) -> int | None:
  """The last integer of the first non-empty line (`37 + 67 = 104.\n\nThis is a classic
  problem, 3 steps...` -> 104), else None."""
  line = next((l for l in response_text.splitlines() if l.strip()), '')
  found = _INTEGER_RE.findall(line)
  return int(found[-1]) if found else None


_PARSERS = {'answer_first': parse_answer, 'first_line': parse_first_line}


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


def operands_hash(xs_NxK) -> np.ndarray:
  """pair_hash folded over the operands (columns of `xs_NxK`); two operands: pair_hash."""
  xs_NxK = np.asarray(xs_NxK)
  h = xs_NxK[..., 0]
  for k in range(1, xs_NxK.shape[-1]):
    h = pair_hash(h, xs_NxK[..., k])
  return h


class ArithmeticTask(Task):
  """`a + b (+ ...)`: `num_operands` operands of `num_digits` digits; see the module
  docstring."""

  name = 'arithmetic'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    cfg = merge_config(default_config(), config)
    if not 1 <= cfg.num_digits <= 9:
      raise ValueError(f'num_digits must be in [1, 9], got {cfg.num_digits}')
    if not 2 <= cfg.num_operands <= 6:
      raise ValueError(f'num_operands must be in [2, 6], got {cfg.num_operands}')
    if not 0.0 < cfg.eval_fraction <= 0.5:
      raise ValueError(f'eval_fraction must be in (0, 0.5], got {cfg.eval_fraction}')
    if not 0.0 <= cfg.slip_prob <= 1.0:
      raise ValueError(f'slip_prob must be in [0, 1], got {cfg.slip_prob}')
    if cfg.slip_check not in ('right', 'consistent'):
      raise ValueError(f"slip_check must be 'right' or 'consistent', got {cfg.slip_check!r}")
    if cfg.answer_format not in _PARSERS:
      raise ValueError(f'answer_format must be one of {sorted(_PARSERS)}, got '
                       f'{cfg.answer_format!r}')
    if '{problem}' not in cfg.prompt_template:
      raise ValueError(f'prompt_template must contain {{problem}}: {cfg.prompt_template!r}')
    self.config = cfg
    self.low, self.high = 10**(cfg.num_digits - 1), 10**cfg.num_digits  # [low, high)
    self.eval_modulus = round(1 / cfg.eval_fraction)

  # -- problems ---------------------------------------------------------------------------

  def is_eval(self, xs_NxK):
    return operands_hash(xs_NxK) % np.uint64(self.eval_modulus) == 0

  def make_problem(self, *xs: int) -> Problem:
    xs = tuple(int(x) for x in xs)
    text = '+'.join(map(str, xs))
    return Problem(id=text, prompt=text, answer=str(sum(xs)),
                   meta={'operands': xs, 'carries': count_carries(*xs)})

  def _draw(self, rng: np.random.Generator, n: int, held_out: bool) -> np.ndarray:
    """`n` operand tuples [n, num_operands] from the train or held-out side, by rejection."""
    out, have = [np.zeros((0, self.config.num_operands), np.int64)], 0
    batch = int(n * 1.25 * (self.eval_modulus if held_out else 1)) + 64
    while have < n:
      # Operand by operand, so two operands draw exactly the (a, b) of earlier releases.
      xs = np.stack([rng.integers(self.low, self.high, batch)
                     for _ in range(self.config.num_operands)], axis=1)
      xs = xs[self.is_eval(xs) == held_out]
      out.append(xs)
      have += len(xs)
    return np.concatenate(out)[:n]

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    return [self.make_problem(*xs) for xs in self._draw(rng, n, held_out=False)]

  @functools.cached_property
  def _eval_tuples(self) -> np.ndarray | None:
    """All held-out operand tuples in a fixed shuffled order, when few enough to list."""
    side = np.arange(self.low, self.high)
    if side.size**self.config.num_operands > _MAX_ENUMERATED:
      return None
    grids = np.meshgrid(*[side] * self.config.num_operands, indexing='ij')
    xs = np.stack([g.ravel() for g in grids], axis=1)
    return np.random.default_rng(_EVAL_SEED).permutation(xs[self.is_eval(xs)])

  def eval_problems(self, n: int) -> list[Problem]:
    """The first `n` held-out problems of a fixed order (so a prefix of any longer list)."""
    tuples = self._eval_tuples
    if tuples is None:
      # Too many tuples to list: sample in fixed-size batches from a fixed seed (so the
      # order does not depend on n), dropping repeats.
      rng, seen, out = np.random.default_rng(_EVAL_SEED), set(), []
      while len(out) < n:
        for xs in map(tuple, self._draw(rng, 4096, held_out=True)):
          if xs not in seen:
            seen.add(xs)
            out.append(xs)
      tuples = out
    elif n > len(tuples):
      raise ValueError(f'asked for {n} eval problems but the held-out split of '
                       f'{self.config.num_operands}-operand {self.config.num_digits}-digit '
                       f'addition has only {len(tuples)} (eval_fraction={self.config.eval_fraction})')
    return [self.make_problem(*xs) for xs in tuples[:n]]

  # -- text and reward ----------------------------------------------------------------------

  def prompt(self, problem: Problem) -> str:
    return self.config.prompt_template.format(problem=problem.prompt)

  def reward(self, response_text: str, problem: Problem) -> float:
    claimed = _PARSERS[self.config.answer_format](response_text)
    return float(claimed is not None and claimed == int(problem.answer))

  def answer_key(self, response_text: str) -> str | None:
    claimed = parse_answer(response_text)
    return None if claimed is None else str(claimed)

  def student(self, problem: Problem, rng: np.random.Generator) -> str:
    return student_response(problem.meta['operands'], rng, self.config.slip_prob,
                            self.config.slip_min_carries, self.config.slip_check)

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """Prompts, student and correct responses, and the instruction, in rotation."""
    for i, p in enumerate(self.train_problems(rng, (n + 3) // 4)):
      texts = (self.prompt(p), self.student(p, rng), correct_response(*p.meta['operands']),
               self.correction_instruction)
      yield from texts[:n - 4 * i]
