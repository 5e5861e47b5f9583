"""Where a MATH response states its answer: `\\boxed{}` groups and `The final answer is`.

`extract_answer` is the one answer a response ends on; `final_answers` is every answer it
states, which is what the grader needs to refuse a response that hedges across several
(`math_grader.verdict`).
"""
from __future__ import annotations

import re

_FINAL_RE = re.compile(r'final answer is\s*:?\s*', re.IGNORECASE)
_STATEMENT_END = re.compile(r'\.?\s*I hope it is correct|\n')
# `$3$ or $5$`: dollar groups joined like this in one statement are one list answer.
_JOINED_RE = re.compile(r'\s*(?:,|\bor\b|\band\b|/)\s*(?:\\text\{\s*\}\s*)?(?=\$)')


def _balanced(text: str, open_at: int) -> str | None:
  """Content of the `{...}` group whose `{` is at `open_at`, or None if unbalanced."""
  depth = 0
  for i in range(open_at, len(text)):
    depth += {'{': 1, '}': -1}.get(text[i], 0)
    if depth == 0:
      return text[open_at + 1:i]
  return None


def all_boxed(text: str) -> list[str]:
  """Contents of every `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), in order."""
  found = []
  for m in re.finditer(r'\\(?:boxed|fbox)', text):
    rest = text[m.end():]
    stripped = rest.lstrip()
    if stripped.startswith('{'):
      got = _balanced(text, m.end() + len(rest) - len(stripped))
      if got is not None:
        found.append(got.strip())
    elif rest.startswith(' '):  # `\boxed 5$`: one token, as in some MATH solutions
      token = re.match(r'\s*([^\s$]+)', rest)
      if token:
        found.append(token.group(1))
  return found


def last_boxed(solution: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}`, else None.

  This is how the MATH release marks the reference answer inside `solution`.
  """
  boxed = all_boxed(solution)
  return boxed[-1] if boxed else None


def _dollar_group(text: str) -> tuple[str, str] | None:
  """`text` starts with `$` or `$$`: (the math up to the matching delimiter, the rest)."""
  delim = '$$' if text.startswith('$$') else '$'
  m = re.compile(r'(?<!\\)' + re.escape(delim)).search(text, len(delim))
  return (text[len(delim):m.start()], text[m.end():]) if m else None


def _statement_answer(rest: str) -> str | None:
  """The answer of one `The final answer is ...` statement (`rest` follows `is`).

  `$X$` (joined groups `$3$ or $5$` become the list `3, 5`), else the text up to `I hope
  it is correct` / the line end, trailing period dropped; `\\boxed` inside is unwrapped.
  """
  answer = None
  if rest.startswith('$'):
    parts, group = [], _dollar_group(rest)
    while group is not None:
      parts.append(group[0])
      joined = _JOINED_RE.match(group[1])
      group = _dollar_group(group[1][joined.end():]) if joined else None
    answer = ', '.join(parts) if parts else None
  if answer is None:
    answer = _STATEMENT_END.split(rest, maxsplit=1)[0]
    answer = answer.strip().strip('$').strip()
    answer = re.sub(r'(?<!\\)\.$', '', answer).strip()
    answer = re.sub(r'^\\\(|\\\)$|^\\\[|\\\]$', '', answer).strip()
  if '\\boxed' in answer or '\\fbox' in answer:
    answer = last_boxed(answer) or answer
  return answer.strip() or None


def _statements(text: str) -> list[str]:
  return [a for a in (_statement_answer(text[m.end():]) for m in _FINAL_RE.finditer(text))
          if a is not None]


def extract_answer(text: str) -> str | None:
  """The final answer in a response, or None.

  Prefers the SCORE.md form `Final Answer: The final answer is $X$. I hope it is
  correct.` (the last one), else the last `\\boxed{}` / `\\fbox{}`.
  """
  statements = _statements(text)
  return statements[-1] if statements else last_boxed(text)


def final_answers(text: str) -> list[str]:
  """Every answer the response states: each final-answer statement and each box, in order
  (a box inside a statement appears twice; the grader compares answers, not strings)."""
  return _statements(text) + all_boxed(text)
