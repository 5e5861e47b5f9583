"""School math from DeepMind's `mathematics-dataset` generator, graded by answer equivalence.

A medium task between the embedded addition demo and MATH: unlimited fresh problems in
chosen modules (`algebra__linear_1d`, `calculus__differentiate`, ...) at a chosen
difficulty, with exact answers (integers, decimals, fractions, polynomials, True/False).

  turn-1 prompt   SCORE.md's math form: solve step by step, end with
                  `Final Answer: The final answer is $answer$. I hope it is correct.`
  instruction     SCORE.md's math correction instruction.
  reward          1 iff the answer in the last `The final answer is ...` equals the
                  generator's answer: exactly as a number (`0.5` = `1/2`, `5.0` = `5`), as a
                  word (True/False), as a comma list element by element, or as a sympy
                  expression (`expand(claimed - reference) == 0`).

The generator (mathematics-dataset 1.0.1) needs small patches for numpy 2 / sympy 1.14,
applied by `_mathematics_dataset_shim` before it is imported.

Reproducibility. The generator draws from the global `random` and `np.random` states; each
problem reseeds both from a 63-bit seed and restores them afterwards, so a problem is a pure
function of (module, difficulty, seed) and the caller's random state is untouched. Training
seeds come from the `rng` the trainer passes; held-out seeds from a fixed per-module stream.

Held-out split. A question is held out iff md5(question text) % (1 / eval_fraction) == 0.
Training draws reject held-out questions and evaluation keeps only them, so the two never
share a question text whatever the seeds (the same sum phrased differently, `Calculate 2 + 3.`
vs `What is 2 + 3?`, is a different question). Costs one md5 per generated question.

Grading is for this generator's answers (Python syntax, `3*x**2 + 1`), not LaTeX.
`score_jax/math_grader.grade` (math-verify, for MATH) is deliberately not used: on this
generator's answers it accepted wrong powers (`-49680*q**2` for `-49680*q**3`, 41 of 801
answers in a check of 14 modules) and rejected factored forms of right ones. Equivalence is
by value, so for `algebra__polynomial_roots` ("Factor ...") an expanded answer also
passes; comma lists (roots, prime factors, sorted sequences) must match in order.

Embedded base model. `base_transcripts` gives (problem, attempts) with short answers in the
final-answer form: each attempt is independently right with probability 1 - `slip_prob` and
otherwise a plausible wrong answer (one number in the right answer changed). A later attempt
is a fresh one, not a correction, so a model trained on them does not self-correct.
"""
from __future__ import annotations

import fractions
import functools
import hashlib
import random
import re
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from score_jax.tasks.base import Problem, Task, merge_config
# The SCORE.md math forms, one home for both math tasks.
from score_jax.tasks.math import CORRECTION_INSTRUCTION, FINAL_ANSWER_FORM
from score_jax.tasks.rewards.verifiers import PooledGrading

PROMPT_TEMPLATE = (
    'Solve the following math problem step by step, as a math expert. At the end, write '
    'your final answer in the form "Final Answer: The final answer is $answer$. I hope it '
    'is correct."\n\nProblem: {question}')

DEFAULT_MODULES = ('algebra__linear_1d', 'arithmetic__add_or_sub', 'arithmetic__mul',
                   'numbers__gcd', 'calculus__differentiate')
_EVAL_SEED = 20241031  # Fixed: the held-out list must not depend on the run's seed.
_MAX_ANSWER_CHARS = 200  # Longer claimed answers are wrong (and bound the grader's work).
_MAX_DRAWS_PER_PROBLEM = 200  # Times 1 / eval_fraction, before giving up.
_MAX_EXPONENT = 10_000  # Exponents above this (numerator or denominator) are refused...
_MAX_EXPANDED_POWER = 40  # ...and powers of sums / products above this.


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='school_math',
      modules=list(DEFAULT_MODULES),  # Generator module names; drawn uniformly.
      difficulty='train-easy',        # train-easy | train-medium | train-hard | interpolate
      eval_difficulty='',             # '' = same as `difficulty`.
      eval_fraction=0.1,              # Share of question texts held out (hash split).
      slip_prob=0.4,                  # P(a base-transcript turn is wrong), per turn.
      prompt_template=PROMPT_TEMPLATE,  # Must contain {question}.
      verifier_workers=2,             # Sympy grading in worker processes; 0 = in-process.
      verifier_timeout_s=10.0,        # Per answer; a late answer scores 0.
  ))


# ---------------------------------------------------------------------------------------
# Answers: extraction and equivalence (module-level, so verifier workers can run them).

_FINAL_PHRASE = 'The final answer is'
_DOLLAR_RE = re.compile(r'\s*:?\s*\$(.+?)\$', re.S)
_PLAIN_RE = re.compile(r'\s*:?\s*(.+?)\.?\s*I hope it is correct', re.S)
_NUMBER_RE = re.compile(r'[+-]?(\d+|\d*\.\d+)(/\d+)?')  # No exponents: 1e999999999 would hang.
_EXPR_CHARS_RE = re.compile(r'[0-9A-Za-z+\-*/^().\s]+')
_WORD_RE = re.compile(r'[A-Za-z]{2,}')
_DIGIT_LETTER_RE = re.compile(r'[\d.][A-Za-z]')


def extract_answer(response_text: str) -> str | None:
  """X of the last `The final answer is $X$` (or `... is X. I hope it is correct`)."""
  start = response_text.rfind(_FINAL_PHRASE)
  if start < 0:
    return None
  tail = response_text[start + len(_FINAL_PHRASE):]
  m = _DOLLAR_RE.match(tail) or _PLAIN_RE.match(tail)
  return m.group(1).strip() if m else None


def _normalise(answer: str) -> str:
  return ' '.join(answer.replace('\\!', '').split()).rstrip('.')


def _as_fraction(text: str) -> fractions.Fraction | None:
  text = text.replace(' ', '')
  if not _NUMBER_RE.fullmatch(text):
    return None
  try:
    return fractions.Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


def quick_match(claimed: str, reference: str) -> bool | None:
  """Decides the cases that need no sympy (strings, numbers); None when undecided."""
  claimed, reference = _normalise(claimed), _normalise(reference)
  if claimed == reference:
    return True
  if reference in ('True', 'False'):
    return claimed.lower() == reference.lower()
  if ',' in reference:  # A list (prime factors, a sorted sequence): element by element.
    got, want = claimed.split(','), reference.split(',')
    return len(got) == len(want) and all(answers_match(g, w) for g, w in zip(got, want))
  ref_value = _as_fraction(reference)
  if ref_value is not None:  # A number must be answered by a number (0.5 = 1/2 = .50).
    return _as_fraction(claimed) == ref_value
  return None


@functools.cache
def _sympy_parser():
  """parse(text) -> an unevaluated sympy tree, with every single letter a plain Symbol (so
  `E`, `I`, `S` are not sympy's constants) and decimals read as exact rationals."""
  import sympy  # pylint: disable=import-outside-toplevel
  from sympy.parsing import sympy_parser as sp  # pylint: disable=import-outside-toplevel
  letters = {c: sympy.Symbol(c) for c in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'}
  global_dict = {'Integer': sympy.Integer, 'Float': sympy.Float, 'Rational': sympy.Rational,
                 'Symbol': sympy.Symbol, 'sqrt': sympy.sqrt, 'Add': sympy.Add,
                 'Mul': sympy.Mul, 'Pow': sympy.Pow, '__builtins__': {}}
  transformations = (sp.auto_number, sp.rationalize, sp.convert_xor)

  def parse(text):
    return sp.parse_expr(text, local_dict=dict(letters), global_dict=dict(global_dict),
                         transformations=transformations, evaluate=False)
  return parse


def _allowed_text(text: str) -> bool:
  """Numbers, single letters, sqrt and arithmetic only: parse_expr runs Python. A digit
  right before a letter is refused: `1e999999999` would be read as a float and made an
  exact 10**999999999 (and `3x` is not valid Python anyway)."""
  return (bool(_EXPR_CHARS_RE.fullmatch(text)) and not _DIGIT_LETTER_RE.search(text)
          and all(w == 'sqrt' for w in _WORD_RE.findall(text)))


def _small_powers(expr, budget: float = _MAX_EXPANDED_POWER) -> bool:
  """True if evaluating and expanding the unevaluated tree `expr` stays cheap.

  `9**9**9` or `(x + 1)**10**6` would not finish. Exponents must be rational numbers of at
  most `_MAX_EXPONENT` (numerator and denominator); over a compound base (a sum, a
  product) the exponents along any nesting path multiply to at most `_MAX_EXPANDED_POWER`.
  """
  if expr.is_Pow:
    base, exponent = expr.args
    if not _small_powers(exponent):
      return False
    value = exponent.doit()  # Cheap: its own powers were just checked.
    if not (value.is_Rational and abs(value.p) <= _MAX_EXPONENT
            and value.q <= _MAX_EXPONENT):
      return False
    if base.is_Atom:
      return True
    budget /= max(1, abs(value))
    if budget < 1:
      return False
  return all(_small_powers(arg, budget) for arg in expr.args)


def sympy_match(claimed: str, reference: str) -> bool:
  """`expand(claimed - reference) == 0`; anything unparseable or too costly is no match."""
  if not (_allowed_text(claimed) and _allowed_text(reference)):
    return False
  parse = _sympy_parser()
  try:
    a, b = parse(claimed), parse(reference)
    if not (_small_powers(a) and _small_powers(b)):
      return False
    return (a.doit() - b.doit()).expand() == 0
  except Exception:  # pylint: disable=broad-except  (SyntaxError, TypeError, sympy errors)
    return False


def answers_match(claimed: str, reference: str) -> bool:
  if len(claimed) > _MAX_ANSWER_CHARS:
    return False
  decided = quick_match(claimed, reference)
  return decided if decided is not None else sympy_match(_normalise(claimed),
                                                         _normalise(reference))


def grade(response_text: str, reference_answer: str) -> float:
  """Binary reward of a response against the generator's answer (0.0 if no final answer)."""
  claimed = extract_answer(response_text)
  return float(claimed is not None and answers_match(claimed, reference_answer))


def _sympy_grade(claimed: str, reference: str) -> float:
  return float(sympy_match(_normalise(claimed), _normalise(reference)))


# ---------------------------------------------------------------------------------------
# Wrong answers for the simulated base model.

_DIGITS_RE = re.compile(r'\d+(?:\.\d+)?')


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
  """A plausible wrong answer: one number in `answer` changed a little (or True<->False)."""
  if answer in ('True', 'False'):
    return 'False' if answer == 'True' else 'True'
  numbers = list(_DIGITS_RE.finditer(answer))
  for _ in range(10):
    if not numbers:
      break
    m = numbers[rng.integers(len(numbers))]
    token = m.group()
    if '.' in token:  # Change the last decimal digit.
      new = token[:-1] + str((int(token[-1]) + int(rng.integers(1, 10))) % 10)
    else:
      new = str(max(0, int(token) + int(rng.choice([-2, -1, 1, 2, 10]))))
    candidate = answer[:m.start()] + new + answer[m.end():]
    if not answers_match(candidate, answer):
      return candidate
  return f'{answer} + 1'


# ---------------------------------------------------------------------------------------
# The task.


def question_hash(question: str) -> int:
  """Stable across processes (Python's hash() is salted), so it can define a split."""
  return int.from_bytes(hashlib.md5(question.encode('utf-8')).digest()[:8], 'little')


def generate(module: str, difficulty: str, seed: int) -> tuple[str, str] | None:
  """(question, answer) of generator `module` from `seed`; None if over the length caps.

  The global random states are reseeded and then restored, so the result depends only on
  the arguments and the caller's random numbers do not move.
  """
  from score_jax.tasks import _mathematics_dataset_shim as shim  # pylint: disable=import-outside-toplevel
  fn = shim.generator_modules(difficulty)[module]
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    problem = fn()
    question, answer = str(problem.question), str(problem.answer)
  except Exception as e:
    raise RuntimeError(f'mathematics-dataset module {module!r} ({difficulty}) failed on '
                       f'seed {seed}') from e
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  if len(question) > shim.MAX_QUESTION_LENGTH or len(answer) > shim.MAX_ANSWER_LENGTH:
    return None
  return question, answer


def _check_modules(modules: Sequence[str], difficulty: str) -> None:
  from score_jax.tasks import _mathematics_dataset_shim as shim  # pylint: disable=import-outside-toplevel
  valid = shim.generator_modules(difficulty)
  bad = [m for m in modules if m not in valid]
  if bad or not modules:
    raise ValueError(f'unknown school_math modules {bad} for difficulty {difficulty!r} '
                     f'(or an empty list); valid: {", ".join(valid)}')


class SchoolMathTask(PooledGrading, Task):
  """mathematics-dataset problems; see the module docstring."""

  name = 'school_math'
  correction_instruction = CORRECTION_INSTRUCTION

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    cfg = merge_config(default_config(), config)
    cfg.eval_difficulty = cfg.eval_difficulty or cfg.difficulty
    for difficulty in (cfg.difficulty, cfg.eval_difficulty):
      _check_modules(list(cfg.modules), difficulty)
    if not 0.0 < cfg.eval_fraction <= 0.5:
      raise ValueError(f'eval_fraction must be in (0, 0.5], got {cfg.eval_fraction}')
    if not 0.0 <= cfg.slip_prob <= 1.0:
      raise ValueError(f'slip_prob must be in [0, 1], got {cfg.slip_prob}')
    if '{question}' not in cfg.prompt_template:
      raise ValueError(f'prompt_template must contain {{question}}: {cfg.prompt_template!r}')
    self.config = cfg
    self.modules = tuple(cfg.modules)
    self.eval_modulus = round(1 / cfg.eval_fraction)
    self._eval: list[Problem] = []
    self._eval_streams = {}  # module -> (rng, seen questions), for extending the list.

  # -- problems ---------------------------------------------------------------------------

  def is_eval(self, question: str) -> bool:
    return question_hash(question) % self.eval_modulus == 0

  def _problem(self, module: str, difficulty: str, seed: int, held_out: bool) -> Problem | None:
    qa = generate(module, difficulty, seed)
    if qa is None or self.is_eval(qa[0]) != held_out:
      return None
    question, answer = qa
    return Problem(id=f'{module}:{question_hash(question):016x}', prompt=question,
                   answer=answer, meta=dict(module=module, difficulty=difficulty, seed=seed))

  def _draw(self, module: str, difficulty: str, seeds: np.random.Generator, held_out: bool,
            seen: set[str] = frozenset()) -> Problem:
    """The first problem from `seeds` on the requested side of the split and not in `seen`."""
    for _ in range(_MAX_DRAWS_PER_PROBLEM * self.eval_modulus):
      problem = self._problem(module, difficulty, int(seeds.integers(2**63)), held_out)
      if problem is not None and problem.prompt not in seen:
        return problem
    raise RuntimeError(
        f'module {module!r} ({difficulty}) gave no new {"held-out" if held_out else "training"} '
        f'question in {_MAX_DRAWS_PER_PROBLEM * self.eval_modulus} draws; its question space '
        f'is too small for this many problems (have {len(seen)})')

  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    modules = [self.modules[i] for i in rng.integers(len(self.modules), size=n)]
    return [self._draw(m, self.config.difficulty, rng, held_out=False) for m in modules]

  def eval_problems(self, n: int) -> list[Problem]:
    """Round-robin over modules, each from its own fixed seed stream, no repeated question.

    The list only ever grows, so `eval_problems(n)` is a prefix of any longer one. Costs
    about 1 / eval_fraction generations per problem (the rest fall on the training side).
    """
    while len(self._eval) < n:
      module = self.modules[len(self._eval) % len(self.modules)]
      if module not in self._eval_streams:
        key = question_hash(module) % 2**32  # Depends on the name, not the list order.
        self._eval_streams[module] = (np.random.default_rng([_EVAL_SEED, key]), set())
      stream, seen = self._eval_streams[module]
      problem = self._draw(module, self.config.eval_difficulty, stream, True, seen)
      seen.add(problem.prompt)
      self._eval.append(problem)
    return self._eval[:n]

  # -- text and reward ----------------------------------------------------------------------

  def prompt(self, problem: Problem) -> str:
    return self.config.prompt_template.format(question=problem.prompt)

  def answer_key(self, response_text: str) -> str | None:
    answer = extract_answer(response_text)
    return None if answer is None else _normalise(answer)

  def reward(self, response_text: str, problem: Problem) -> float:
    return grade(response_text, problem.answer)

  def rewards(self, response_texts: Sequence[str], problems: Sequence[Problem]) -> np.ndarray:
    """String and number answers are graded here; the rest (sympy) in worker processes,
    each under `verifier_timeout_s`."""
    out_N = np.zeros(len(response_texts), np.float32)
    need_sympy = []
    for i, (text, problem) in enumerate(zip(response_texts, problems)):
      claimed = extract_answer(text)
      if claimed is None or len(claimed) > _MAX_ANSWER_CHARS:
        continue
      decided = quick_match(claimed, problem.answer)
      if decided is None:
        need_sympy.append((i, (claimed, problem.answer)))
      else:
        out_N[i] = float(decided)
    if need_sympy:
      index, args = zip(*need_sympy)
      out_N[list(index)] = self.pooled(_sympy_grade, args)
    return out_N

  # -- embedded base model ----------------------------------------------------------------

  def student(self, problem: Problem, rng: np.random.Generator) -> str:
    """One short attempt: the right answer, or with `slip_prob` a plausible wrong one."""
    answer = problem.answer
    if rng.random() < self.config.slip_prob:
      answer = wrong_answer(answer, rng)
    return FINAL_ANSWER_FORM.format(answer=answer)

  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """Prompts, student and correct responses, and the instruction, in rotation."""
    for i, p in enumerate(self.train_problems(rng, (n + 3) // 4)):
      texts = (self.prompt(p), self.student(p, rng),
               FINAL_ANSWER_FORM.format(answer=p.answer), self.correction_instruction)
      yield from texts[:n - 4 * i]
