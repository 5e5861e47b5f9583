"""The binary oracle reward for MATH: is a model's final answer equal to the reference?

SCoRe learns only from this bit, so a grader that calls a right answer wrong (or the
reverse) teaches the wrong thing. Equality is decided in three layers:

1. `math_normalize.normalize`: a MATH-specific string canonicalisation (units, `\\dfrac`,
   thousands separators, `x = 5`, ...). Equal canonical strings are equal answers.
2. Exact special cases that a symbolic checker gets wrong for MATH answers:
   numbers are compared as exact rationals (`0.333333` is not `1/3`; a 30-digit integer
   off by one is wrong), multiple-choice letters, base-`b` digit strings (`1011_2`),
   word answers (`\\text{Monday}`), and different units (`5 cm` vs `5 m`).
3. Otherwise `math-verify` (sympy) with decimals rewritten as exact fractions, so its
   6-place float rounding cannot accept an approximation.

Conventions (what a careful human MATH grader does; tests/data/math_equiv_labels.jsonl):
- An exactly equal value in another form is right (`1/2` = `0.5` = `\\frac{2}{4}`); a
  rounded one is not (`0.333` for `1/3`), nor `1/3` where the reference is the rounded
  decimal `0.33` that the question asked for.
- `\\%`, `^\\circ`, `\\$` and units are labels, not values: `50\\%` = `50`, but `0.5` is
  not `50\\%` (MATH "what percent" answers are the number of percent).
- A comma list without brackets is the list of all solutions (order free); `(a, b)` is
  ordered; `{...}` is a set. `1,000` without brackets and spaces is one thousand.
- `1011_2`: the digits in the asked base are the answer; the decimal value is not.

The reward asks more than equality: the response must commit to its answer (see
"Commitment" below, `verdict`): a hedge across several answers or an unevaluated
expression is refused with a reason (`VERDICTS`) that the task counts.

Timeouts: math-verify bounds sympy with `signal.alarm`, which works only in the main
thread; elsewhere the alarm is off, so inputs that could make sympy or big-int arithmetic
run away (huge powers/factorials, very long answers) are never handed to it.
"""
from __future__ import annotations

import fractions
import logging
import math
import re
import threading

from score_jax.tasks.rewards.math_extract import final_answers
from score_jax.tasks.rewards.math_normalize import (TEXT_CMD, drop_assignments, normalize,
                                                    squash)

_MAX_SYMPY_CHARS = 400        # longer answers are compared as strings only
_MAX_EXPONENT = 2000          # `2^{100000}` would freeze sympy/bigint work uninterruptibly
_MAX_FACTORIAL = 300

logging.getLogger('math_verify').setLevel(logging.ERROR)  # per-call timeout warnings

# ---------------------------------------------------------------------------------------
# Exact comparisons.

_NUM = r'-?(?:\d+\.?\d*|\.\d+)'


def exact_value(s: str) -> fractions.Fraction | None:
  """The exact rational value of a plain numeric answer, else None.

  Handles integers, decimals, repeating decimals (`0.1\\overline{6}`), fractions
  (`\\frac{3}{4}`, `\\frac34`, `3/4`, signs anywhere), mixed numbers (`3\\frac{1}{2}`)
  and scientific notation (`3.2\\times10^{-3}`, `1.5e8`).
  """
  s = squash(s)
  if re.fullmatch(r'\([^(),]*\)', s):
    s = s.strip('()')
  F = fractions.Fraction
  if re.fullmatch(_NUM, s):
    return F(s)
  m = re.fullmatch(r'(-?)(\d*)\.(\d*)\\overline\{(\d+)\}', s)
  if m:
    sign, whole, fixed, rep = m.groups()
    base = F(f'{whole or 0}.{fixed or 0}')
    rep_val = F(int(rep), (10**len(rep) - 1) * 10**len(fixed))
    return (base + rep_val) * (-1 if sign else 1)
  m = re.fullmatch(r'(-?)\\frac\{(' + _NUM + r')\}\{(' + _NUM + r')\}', s) or re.fullmatch(
      r'(-?)\(?(' + _NUM + r')\)?/\(?(' + _NUM + r')\)?', s)
  if m and F(m.group(3)) != 0:
    return F(m.group(2)) / F(m.group(3)) * (-1 if m.group(1) else 1)
  m = re.fullmatch(r'(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}', s)
  if m and 0 < int(m.group(3)) < int(m.group(4)):
    return (int(m.group(2)) + F(int(m.group(3)), int(m.group(4)))) * (-1 if m.group(1) else 1)
  m = re.fullmatch(r'(' + _NUM + r')(?:\\times|\\cdot)10\^\{?(-?\d+)\}?|(' + _NUM +
                   r')[eE]([-+]?\d+)', s)
  if m:
    mant, exp = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if abs(int(exp)) <= _MAX_EXPONENT:
      return F(mant) * F(10)**int(exp)
  return None


def _choices(s: str) -> frozenset[str] | None:
  """Multiple-choice letters: `(A)`, `A`, `\\text{(A)}`, `(A), (C)` -> {'A', ...}."""
  items = [p.strip() for p in s.split(',')]
  letters = [re.fullmatch(r'\(([A-E])\)|([A-E])', p) for p in items]
  if not all(letters):
    return None
  return frozenset(m.group(1) or m.group(2) for m in letters)


_BASE_WORDS = {'two': 2, 'three': 3, 'four': 4, 'five': 5, 'six': 6, 'seven': 7,
               'eight': 8, 'nine': 9, 'ten': 10, 'sixteen': 16}


def _base_digits(s: str) -> tuple[str, int | None] | None:
  """(`digits`, base) for `1011_2`, `2A_{16}`, `1011_{two}`; (`digits`, None) for `1011`."""
  m = re.fullmatch(r'([0-9A-Za-z]+)_\{?(\d+|[a-z]+)\}?', squash(s))
  if m:
    base = m.group(2)
    base = int(base) if base.isdigit() else _BASE_WORDS.get(base)
    return (m.group(1).upper(), base) if base and 2 <= base <= 36 else None
  return (s.upper(), None) if re.fullmatch(r'[0-9A-Za-z]+', s) else None


def _words(s: str) -> str | None:
  """Lower-cased words of a word answer (`\\text{Devon and Ellie}`), else None."""
  if re.fullmatch(r'[A-Za-z][A-Za-z \'-]*[A-Za-z]', s) and len(re.sub(r'\W', '', s)) > 1:
    return ' '.join(s.lower().split())
  return None


def _too_expensive(s: str) -> bool:
  """Inputs whose evaluation can run away inside C code that no alarm interrupts."""
  if len(s) > _MAX_SYMPY_CHARS or re.search(r'\^\s*\{[^{}]*\^', s):
    return True
  exps = re.findall(r'\^\s*\{?\s*-?(\d+)', s) + re.findall(r'[eE][-+]?(\d+)', s)
  facts = re.findall(r'(\d+)\s*!', s)
  return (any(len(e) > 6 or int(e) > _MAX_EXPONENT for e in exps)
          or any(len(f) > 6 or int(f) > _MAX_FACTORIAL for f in facts))


def _decimals_to_fractions(s: str) -> str:
  """`0.5x` -> `\\frac{5}{10}x`: math-verify then never rounds floats (6 places)."""
  return re.sub(r'(?<![\d.])(\d*)\.(\d+)(?![\d.])',
                lambda m: f'\\frac{{{m.group(1)}{m.group(2)}}}{{1{"0" * len(m.group(2))}}}', s)


def _math_verify(pred: str, ref: str, timeout_s: float | None) -> bool:
  import math_verify  # pylint: disable=import-outside-toplevel
  on_main = threading.current_thread() is threading.main_thread()
  seconds = max(1, math.ceil(timeout_s)) if (timeout_s and on_main) else None
  # Its own unit stripping is off: it deletes `h`, `m`, `ab` after numbers (so `x+2h` would
  # equal `x+2`); `normalize` has already removed the units a MATH answer carries.
  config = [math_verify.LatexExtractionConfig(
      normalization_config=math_verify.parser.NormalizationConfig(
          basic_latex=True, units=False, malformed_operators=True, nits=True, boxed='all',
          equations=False)),
            math_verify.ExprExtractionConfig()]
  gold = math_verify.parse(f'${_decimals_to_fractions(ref)}$', config, parsing_timeout=seconds)
  target = math_verify.parse(f'${_decimals_to_fractions(pred)}$', config,
                             parsing_timeout=seconds)
  if not gold or not target:
    return False
  return bool(math_verify.verify(gold, target, allow_set_relation_comp=True,
                                 timeout_seconds=seconds))


def _prepare(pred: str, ref: str) -> tuple[str, str] | None:
  """Both answers normalised for comparison; None when they cannot be equal (empty, or
  different units)."""
  p, p_unit = normalize(pred)
  r, r_unit = normalize(ref)
  if not p or not r or (p_unit and r_unit and p_unit != r_unit):
    return None
  if '=' not in r and '=' in p:
    p = drop_assignments(p)
  elif '=' in r and '=' not in p and re.match(r'^[A-Za-z]\s*=', r):
    r = drop_assignments(r)
  return p, r


def _equal(p: str, r: str, ref: str, timeout_s: float | None) -> bool:
  """Prepared answers `p`, `r` (of the raw reference `ref`) are equal values."""
  if squash(p) == squash(r):
    return True
  r_choices = _choices(r)
  if r_choices is not None:
    return _choices(p) == r_choices
  r_base, p_base = _base_digits(r), _base_digits(p)
  if r_base and p_base and (r_base[1] or p_base[1]):
    return r_base[0] == p_base[0] and None in (r_base[1], p_base[1]) or r_base == p_base
  rv, pv = exact_value(r), exact_value(p)
  if rv is not None and pv is not None:
    return rv == pv  # exact rationals: no float rounding, no 15-digit limit
  r_words = _words(r) if re.search(TEXT_CMD, ref) or ' ' in r else None
  if r_words is not None:
    p_words = _words(p)
    if p_words is not None or rv is None:
      return p_words == r_words
  if _too_expensive(p) or _too_expensive(r):
    return False
  return _math_verify(p, r, timeout_s)


def is_equivalent(pred: str, ref: str, timeout_s: float | None = 5.0) -> bool:
  """True iff `pred` and `ref` are equal values as MATH answers (see the module docstring).

  Equal values only; whether `pred` commits to that value is `answer_verdict`'s question.
  """
  prepared = _prepare(pred, ref)
  return prepared is not None and _equal(*prepared, ref, timeout_s)


# ---------------------------------------------------------------------------------------
# Commitment: a right value is paid only when the response commits to it.
#
# RL pays whatever the grader accepts, so hedges are refused even when one of their answers
# is right: several different final answers, a list or `or` where the reference is one
# value, every choice of a multiple-choice question, an interval or set that contains the
# reference; and right values the response did not work out: operators absent from the
# reference (`\\binom{10}{3}` for `120`, `\\sin(\\pi/3)`, `\\sum`, `\\int`, `5!`) or free
# variables it does not have (`\\frac{2x}{x}` for `2`). A list, set or interval is still
# right where the reference is that list, set or interval.

VERDICTS = ('wrong', 'right', 'no_answer', 'hedged', 'unevaluated')  # index 0: what a
# late or crashed item of the verifier pool scores, so it must be 'wrong'
_MAX_ANSWERS = 6    # distinct answers in one response that are compared one by one
_OPERATORS = {      # family -> pattern; the same family in the reference is allowed
    'sum': r'\\sum', 'product': r'\\prod', 'integral': r'\\i+nt(?![A-Za-z])|\\oint',
    'limit': r'\\lim', 'binomial': r'\\[dt]?binom|\\choose', 'factorial': r'!',
    'trig': r'\\(?:arc)?(?:sin|cos|tan|sec|csc|cot)h?(?![A-Za-z])',
    'log': r'\\(?:log|ln|lg|exp)(?![A-Za-z])',
    'derivative': r'\\frac\{d|\\partial|\\prime|\'',
    'extremum': r'\\(?:gcd|lcm|max|min|det)(?![A-Za-z])',
}
_CHOICE_SEP = re.compile(r'\s*(?:,|/|;|&|\bor\b|\band\b|\s)\s*')
_INTERVAL_RE = re.compile(r'[\[(]([^,\[\]()]+),([^,\[\]()]+)[\])]')


def _top_level_split(s: str) -> list[str]:
  """`s` split at commas outside brackets (`(1,2), 3` -> [`(1,2)`, `3`])."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(s):
    if c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
    elif c == ',' and depth == 0:
      parts.append(s[start:i].strip())
      start = i + 1
  return parts + [s[start:].strip()]


def _alternatives(s: str) -> list[str]:
  """The answers a prepared answer states: list items, set elements, both signs of
  `\\pm`, or several choice letters; [s] for one answer."""
  if re.fullmatch(r'\\\{.*\\\}', s):
    s = s[2:-2]
  items = [p for p in _top_level_split(s) if p]
  if len(items) == 1:
    m = re.fullmatch(r'(.*?)\\(?:pm|mp)(.+)', items[0])
    if m:
      head = m.group(1).strip()
      return [f'{head}+{m.group(2)}', f'{head}-{m.group(2)}'] if head else [
          m.group(2), f'-{m.group(2)}']
    letters = _CHOICE_SEP.split(re.sub(r'[()]', ' ', items[0]).strip())
    if len(letters) > 1 and all(re.fullmatch(r'[A-E]', x) for x in letters):
      return letters
    if re.fullmatch(r'[A-E]{2,5}', items[0]):  # `ABCDE`: every option at once
      return list(items[0])
  return items


def _bound(s: str):
  s = squash(s)
  if s in ('\\infty', '+\\infty'):
    return math.inf
  return -math.inf if s == '-\\infty' else exact_value(s)


def _swallows(p: str, value) -> bool:
  """`p` is an interval (or a union of intervals) that contains the number `value`."""
  for part in re.split(r'\\cup', p):
    m = _INTERVAL_RE.fullmatch(squash(part))
    lo, hi = (_bound(m.group(1)), _bound(m.group(2))) if m else (None, None)
    if lo is not None and hi is not None and lo < hi and lo <= value <= hi:
      return True
  return False


def _is_one_answer(r: str) -> bool:
  return (len(_alternatives(r)) == 1 and not _INTERVAL_RE.fullmatch(squash(r))
          and not re.search(r'\\cup|[<>]|\\[lg]e', r))


def _hedges(p: str, r: str, ref: str, timeout_s: float | None) -> bool:
  """`p` states several answers, one of them the single answer `r`."""
  if not _is_one_answer(r):
    return False
  value = exact_value(r)
  if value is not None and _swallows(p, value):
    return True
  items = _alternatives(p)
  return len(items) > 1 and any(_equal(i, r, ref, timeout_s) for i in items[:_MAX_ANSWERS])


def _letters(s: str) -> set[str]:
  """Variable letters of an answer, lower-cased: not LaTeX commands or environments, not
  subscripts (`1011_{two}`), exponents (`1.5e8`) or a prose aside (`2 (since x>0)`)."""
  s = re.sub(r'\s*\([^()]*[A-Za-z]{3}[^()]*\)$', '', s)
  s = re.sub(r'\\(?:begin|end)\{[^{}]*\}|_\{[^{}]*\}|_\w|\\[A-Za-z]+|(?<=\d)[eE](?=[-+]?\d)', ' ', s)
  return set(re.findall(r'[a-z]', s.lower()))


def _uncommitted(p: str, r: str) -> bool:
  """`p` (equal in value to `r`) leaves work undone: an operator family the reference
  does not use, or (for a one-value reference) a variable the reference does not have;
  an interval reference may be answered by an inequality in `x`."""
  ops = lambda s: {k for k, pat in _OPERATORS.items() if re.search(pat, s)}
  return bool(ops(p) - ops(r) or _is_one_answer(r) and _letters(p) - _letters(r))


def answer_verdict(pred: str, ref: str, timeout_s: float | None = 5.0) -> str:
  """'right', 'wrong', 'hedged' or 'unevaluated' for one stated answer (see above)."""
  prepared = _prepare(pred, ref)
  if prepared is None:
    return 'wrong'
  p, r = prepared
  if _equal(p, r, ref, timeout_s):
    return 'unevaluated' if _uncommitted(p, r) else 'right'
  return 'hedged' if _hedges(p, r, ref, timeout_s) else 'wrong'


def verdict(response_text: str, reference_answer: str) -> str:
  """One of VERDICTS for a whole response: every answer it states must be right."""
  answers, seen = [], set()
  for a in final_answers(response_text):
    key = squash(normalize(a)[0])
    if key not in seen:
      seen.add(key)
      answers.append(a)
  if not answers:
    return 'no_answer'
  verdicts = {answer_verdict(a, reference_answer) for a in answers[:_MAX_ANSWERS]}
  if len(answers) > _MAX_ANSWERS:
    verdicts.add('wrong')
  if len(verdicts) == 1:
    return verdicts.pop()
  return 'hedged' if verdicts - {'wrong'} else 'wrong'


def _safe_verdict(response_text: str, reference_answer: str) -> str:
  try:
    return verdict(response_text, reference_answer)
  except BaseException as e:  # math-verify's TimeoutException is a BaseException
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
      raise
    return 'wrong'


def grade(response_text: str, reference_answer: str) -> float:
  """1.0 if the response commits to a final answer equal to the reference, else 0.0;
  never raises. A top-level function so that a process pool can pickle it."""
  return float(_safe_verdict(response_text, reference_answer) == 'right')


def verdict_code(response_text: str, reference_answer: str) -> float:
  """`VERDICTS.index(verdict)` as a float: the verifier pool carries floats only."""
  return float(VERDICTS.index(_safe_verdict(response_text, reference_answer)))
