"""The binary oracle reward for MATH: is a model's final answer equal to the reference?

SCoRe learns only from this bit, so a grader that calls a right answer wrong (or the
reverse) teaches the wrong thing. Equality is decided in three layers:

1. `normalize`: a MATH-specific string canonicalisation (Hendrycks' `strip_string`,
   extended): `\\dfrac`/`\\tfrac`, `\\left`/`\\right`, thin spaces, `^\\circ`, `\\%`,
   `\\$`, units in `\\text{}`, thousands separators (`10,\\!000`), trailing prose,
   `x = 5`-style assignments. Equal canonical strings are equal answers.
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

_MAX_SYMPY_CHARS = 400        # longer answers are compared as strings only
_MAX_EXPONENT = 2000          # `2^{100000}` would freeze sympy/bigint work uninterruptibly
_MAX_FACTORIAL = 300
_CHOICES = 'ABCDE'

logging.getLogger('math_verify').setLevel(logging.ERROR)  # per-call timeout warnings

# ---------------------------------------------------------------------------------------
# Extraction.


def _balanced(text: str, open_at: int) -> str | None:
  """Content of the `{...}` group whose `{` is at `open_at`, or None if unbalanced."""
  depth = 0
  for i in range(open_at, len(text)):
    depth += {'{': 1, '}': -1}.get(text[i], 0)
    if depth == 0:
      return text[open_at + 1:i]
  return None


def last_boxed(solution: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), else None.

  This is how the MATH release marks the reference answer inside `solution`.
  """
  starts = [m for m in re.finditer(r'\\(?:boxed|fbox)', solution)]
  for m in reversed(starts):
    rest = solution[m.end():]
    stripped = rest.lstrip()
    if stripped.startswith('{'):
      got = _balanced(solution, m.end() + len(rest) - len(stripped))
      if got is not None:
        return got.strip()
    elif rest.startswith(' '):  # `\boxed 5$`: one token, as in some MATH solutions
      token = re.match(r'\s*([^\s$]+)', rest)
      if token:
        return token.group(1)
  return None


_FINAL_RE = re.compile(r'final answer is\s*:?\s*', re.IGNORECASE)


def _dollar_group(text: str) -> str | None:
  """`text` starts with `$` or `$$`: the math up to the matching unescaped delimiter."""
  delim = '$$' if text.startswith('$$') else '$'
  m = re.compile(r'(?<!\\)' + re.escape(delim)).search(text, len(delim))
  return text[len(delim):m.start()] if m else None


def extract_answer(text: str) -> str | None:
  """The final answer in a response, or None.

  Prefers the SCORE.md form `Final Answer: The final answer is $X$. I hope it is
  correct.` (the last one; `$` optional, trailing period dropped, `\\boxed` inside
  unwrapped), else the last `\\boxed{}` / `\\fbox{}`.
  """
  matches = list(_FINAL_RE.finditer(text))
  if matches:
    rest = text[matches[-1].end():]
    if rest.startswith('$'):
      answer = _dollar_group(rest)
    else:
      answer = None
    if answer is None:
      answer = re.split(r'\.?\s*I hope it is correct|\n', rest, maxsplit=1)[0]
      answer = answer.strip().strip('$').strip()
      answer = re.sub(r'(?<!\\)\.$', '', answer).strip()
      answer = re.sub(r'^\\\(|\\\)$|^\\\[|\\\]$', '', answer).strip()
    if '\\boxed' in answer or '\\fbox' in answer:
      answer = last_boxed(answer) or answer
    if answer.strip():
      return answer.strip()
  return last_boxed(text)


# ---------------------------------------------------------------------------------------
# Normalisation.

_UNITS = {  # spelling -> canonical unit; only these can veto an otherwise equal answer
    'cm': 'cm', 'centimeter': 'cm', 'centimeters': 'cm', 'mm': 'mm', 'millimeters': 'mm',
    'm': 'm', 'meter': 'm', 'meters': 'm', 'km': 'km', 'kilometers': 'km',
    'in': 'in', 'inch': 'in', 'inches': 'in', 'ft': 'ft', 'foot': 'ft', 'feet': 'ft',
    'yd': 'yd', 'yard': 'yd', 'yards': 'yd', 'mi': 'mi', 'mile': 'mi', 'miles': 'mi',
    's': 's', 'sec': 's', 'second': 's', 'seconds': 's', 'min': 'min', 'minute': 'min',
    'minutes': 'min', 'h': 'h', 'hr': 'h', 'hour': 'h', 'hours': 'h', 'day': 'day',
    'days': 'day', 'g': 'g', 'gram': 'g', 'grams': 'g', 'kg': 'kg', 'kilograms': 'kg',
}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten eleven twelve thirteen '
    'fourteen fifteen sixteen seventeen eighteen nineteen twenty'.split())}
_UNICODE = str.maketrans({  # what chat-tuned models print instead of LaTeX
    '\u2212': '-', '\u00b0': '^\\circ', '\u221a': '\\sqrt ', '\u03c0': '\\pi ',
    '\u221e': '\\infty ', '\u00bd': '\\frac{1}{2}', '\u00bc': '\\frac{1}{4}',
    '\u00be': '\\frac{3}{4}', '\u00b2': '^2', '\u00b3': '^3', '\u00d7': '\\times ',
    '\u00b7': '\\cdot ', '\u2264': '\\le ', '\u2265': '\\ge ', '\u00b1': '\\pm ',
})
_TEXT_CMD = r'\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)'
_PROSE_PREFIX = re.compile(
    r'^(?:the\s+)?(?:final\s+)?(?:answer|result|solution)\s*(?:is|:)\s*', re.IGNORECASE)


def _strip_text_wrappers(s: str) -> str:
  """`\\text{abc}` -> `abc` (innermost first, so nested wrappers also go)."""
  prev = None
  while prev != s:
    prev = s
    s = re.sub(_TEXT_CMD + r'\s*\{([^{}]*)\}', r'\1', s)
  return s


def _split_unit(s: str) -> tuple[str, str | None]:
  """(`s` without a trailing unit / words, the canonical unit if one was known).

  Only space-separated trailing words count as prose or units (`\\text{ cm}` was turned
  into ` cm`), and single letters only if they are units, so `4ab`, `x+2h`, `5 x` keep
  their variables.
  """
  m = re.match(r'^(.*?[\d}).\\a-zA-Z])\s+((?:[A-Za-z]{2,}|cm|m|s|h|g)'
               r'(?:\s+[A-Za-z]+)*)\s*(?:\^\{?[23]\}?)?$', s)
  if (not m or not re.search(r'[\d}]', m.group(1))
      or re.search(r'\\(?:sqrt|frac|sin|cos|tan|sec|csc|cot|log|ln|exp|arc[a-z]+)$',
                   m.group(1))):
    return s, None
  words = m.group(2).lower().split()
  unit = _UNITS.get(words[-1]) or _UNITS.get(words[0])
  if len(words[0]) == 1 and words[0] not in _UNITS:
    return s, None
  return m.group(1).strip(), unit


def _thousands(s: str) -> str:
  """`12,345,678` -> `12345678` outside brackets; `(10,200)` and `5, 100` stay lists."""
  if re.search(r'[()\[\]{}]', s.replace('\\frac', '')):
    return s
  return re.sub(r'(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,])',
                lambda m: m.group(1) + m.group(2).replace(',', ''), s)


def normalize(answer: str) -> tuple[str, str | None]:
  """(canonical answer string, canonical unit or None)."""
  s = answer.strip().translate(_UNICODE)
  # Python-style powers (models that think in code write `x**2`): LaTeX reads `**` as
  # two products, which made `q**3` equal `q**2`.
  s = re.sub(r'\*\*\s*(\w+|\([^()]*\))', lambda m: '^{' + m.group(1).strip('()') + '}', s)
  s = re.sub(r'\\sqrt\s*(\d+)', r'\\sqrt{\1}', s)
  if re.fullmatch(r'\\(?:boxed|fbox)\s*\{.*\}', s, re.DOTALL):
    s = last_boxed(s) or s
  s = re.sub(r'\\(?:displaystyle|left|right|big|Big|bigg|Bigg)(?![a-zA-Z])', '', s)
  s = re.sub(r'\\!', '', s)                          # negative space: `10,\!000`
  s = re.sub(r'\\[,;:]|(?<!\\)\\ |~', ' ', s)
  s = s.replace('{,}', ',').replace('\\dfrac', '\\frac').replace('\\tfrac', '\\frac')
  s = re.sub(r'\\(?:varnothing)', r'\\emptyset', s)
  s = re.sub(r'\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\bdegrees?\b', '', s)
  s = re.sub(r'\\?%|\bpercent\b', '', s)
  s = re.sub(r'\\\$|\bdollars?\b', '', s)
  s = _PROSE_PREFIX.sub('', s.strip())
  s = re.sub(r'(?<!\\)[.\s]+$', '', s)                 # trailing period of a sentence
  s = re.sub(r'\\text\s*\{\s*(or|and)\s*\}|\s+(?:or|and)\s+(?=[-\d\\(\[x])', ', ', s)
  # Units: `\text{ cm}^2` and bare trailing words go; remember the unit.
  s = re.sub(_TEXT_CMD + r'\s*\{\s*([A-Za-z][A-Za-z ]*)\}\s*(\^\{?[23]\}?)?$',
             lambda m: ' ' + m.group(1).strip() if re.search(r'[\d}]', s[:m.start()])
             else m.group(0), s)
  s = _strip_text_wrappers(s)
  s, unit = _split_unit(s.strip())
  s = _thousands(s)
  s = re.sub(r'\s+', ' ', s).strip()
  if s.lower() in _NUMBER_WORDS:
    s = _NUMBER_WORDS[s.lower()]
  if s.lower() in ('infinity', 'inf', '\\infty', 'oo'):
    s = '\\infty'
  s = s.replace('\\mathbb{R}', '(-\\infty,\\infty)').replace('\\mathbb R', '(-\\infty,\\infty)')
  return s, unit


def _squash(s: str) -> str:
  """Spacing- and brace-insensitive key: `\\frac {1} {2}` ~ `\\frac12`."""
  s = re.sub(r'\s+', '', s)
  s = re.sub(r'\\(frac|sqrt)(\d)(\d)', r'\\\1{\2}{\3}', s)
  s = re.sub(r'\\sqrt(\d)', r'\\sqrt{\1}', s)
  return s


def _drop_assignments(s: str) -> str:
  """`x = 5` -> `5`; `a=3, b=4` -> `3, 4`; `(a,b)=(3,4)` -> `(3,4)` (for a bare ref)."""
  items = [p.strip() for p in s.split(',')]
  if len(items) > 1 and all(re.fullmatch(r'[A-Za-z]\w*\s*=\s*[^=]+', p) for p in items):
    return ', '.join(p.split('=', 1)[1].strip() for p in items)
  return s.rsplit('=', 1)[1].strip() if '=' in s else s


# ---------------------------------------------------------------------------------------
# Exact comparisons.

_NUM = r'-?(?:\d+\.?\d*|\.\d+)'


def exact_value(s: str) -> fractions.Fraction | None:
  """The exact rational value of a plain numeric answer, else None.

  Handles integers, decimals, repeating decimals (`0.1\\overline{6}`), fractions
  (`\\frac{3}{4}`, `\\frac34`, `3/4`, signs anywhere), mixed numbers (`3\\frac{1}{2}`)
  and scientific notation (`3.2\\times10^{-3}`, `1.5e8`).
  """
  s = _squash(s)
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
  m = re.fullmatch(r'([0-9A-Za-z]+)_\{?(\d+|[a-z]+)\}?', _squash(s))
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


def is_equivalent(pred: str, ref: str, timeout_s: float | None = 5.0) -> bool:
  """True iff `pred` and `ref` are equal as MATH answers (see the module docstring)."""
  p, p_unit = normalize(pred)
  r, r_unit = normalize(ref)
  if not p or not r:
    return False
  if p_unit and r_unit and p_unit != r_unit:
    return False
  if '=' not in r and '=' in p:
    p = _drop_assignments(p)
  elif '=' in r and '=' not in p and re.match(r'^[A-Za-z]\s*=', r):
    r = _drop_assignments(r)
  if _squash(p) == _squash(r):
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
  r_words = _words(r) if re.search(_TEXT_CMD, ref) or ' ' in r else None
  if r_words is not None:
    p_words = _words(p)
    if p_words is not None or rv is None:
      return p_words == r_words
  if _too_expensive(p) or _too_expensive(r):
    return False
  return _math_verify(p, r, timeout_s)


def grade(response_text: str, reference_answer: str) -> float:
  """1.0 if the response's final answer equals the reference, else 0.0; never raises.

  A top-level function so that a process pool can pickle it.
  """
  try:
    answer = extract_answer(response_text)
    return float(answer is not None and is_equivalent(answer, reference_answer))
  except BaseException as e:  # math-verify's TimeoutException is a BaseException
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
      raise
    return 0.0
