"""MATH answers in canonical form: what `math_grader` compares before any symbolic check.

A MATH-specific string canonicalisation (Hendrycks' `strip_string`, extended): `\\dfrac` /
`\\tfrac`, `\\left` / `\\right`, thin spaces, `^\\circ`, `\\%`, `\\$`, units in `\\text{}`,
thousands separators (`10,\\!000`), trailing prose, `x = 5`-style assignments.
"""
from __future__ import annotations

import re

from score_jax.tasks.rewards.math_extract import last_boxed

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
TEXT_CMD = r'\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)'
_PROSE_PREFIX = re.compile(
    r'^(?:the\s+)?(?:final\s+)?(?:answer|result|solution)\s*(?:is|:)\s*', re.IGNORECASE)


def _strip_text_wrappers(s: str) -> str:
  """`\\text{abc}` -> `abc` (innermost first, so nested wrappers also go)."""
  prev = None
  while prev != s:
    prev = s
    s = re.sub(TEXT_CMD + r'\s*\{([^{}]*)\}', r'\1', s)
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
  s = re.sub(TEXT_CMD + r'\s*\{\s*([A-Za-z][A-Za-z ]*)\}\s*(\^\{?[23]\}?)?$',
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


def squash(s: str) -> str:
  """Spacing- and brace-insensitive key: `\\frac {1} {2}` ~ `\\frac12`."""
  s = re.sub(r'\s+', '', s)
  s = re.sub(r'\\(frac|sqrt)(\d)(\d)', r'\\\1{\2}{\3}', s)
  s = re.sub(r'\\sqrt(\d)', r'\\sqrt{\1}', s)
  return s


def drop_assignments(s: str) -> str:
  """`x = 5` -> `5`; `a=3, b=4` -> `3, 4`; `(a,b)=(3,4)` -> `(3,4)` (for a bare ref)."""
  items = [p.strip() for p in s.split(',')]
  if len(items) > 1 and all(re.fullmatch(r'[A-Za-z]\w*\s*=\s*[^=]+', p) for p in items):
    return ', '.join(p.split('=', 1)[1].strip() for p in items)
  return s.rsplit('=', 1)[1].strip() if '=' in s else s
