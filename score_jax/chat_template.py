"""A model's own chat template, rendered as transformers renders it, and the SCoRe
conversation format derived from it.

`render` reproduces `transformers.utils.chat_template_utils` (its sandboxed jinja2
environment: trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a `tojson`
that does not escape HTML, `strftime_now`, the `{% generation %}` tag) with the
tokenizer's special-token strings (`bos_token`, `eos_token`, ...) as variables, as
`apply_chat_template` passes them.

`prompt_format` turns the template into a `PromptFormat` for the SCoRe conversation
[user: prompt] -> assistant y1 -> [user: instruction] -> assistant y2 (-> ... more turns):
it renders conversations whose contents are sentinel strings and cuts the text around
them into the turn-1 wrapper (system prompt, user turn, generation prompt) and the
wrapper of every later user turn. A sampled answer ends with the template's end-of-turn
token, which the sampler keeps in y1 as the stop token, so the turn-2 wrapper starts
right after it. The cut is checked: a template that renders turns differently in
different positions (one that rewrites earlier assistant turns, say) is refused with the
text that differed, rather than approximated. Contents are inserted as sampled, so a
template that trims message contents matches only answers without outer whitespace.
"""
import datetime
import json

from score_jax.tasks.formats import PromptFormat

_PROMPT, _ANSWER, _INSTRUCTION = '@@PROMPT@@', '@@ANSWER@@', '@@INSTRUCTION@@'


class ChatTemplateError(ValueError):
  """A template that cannot give a fixed per-turn format (names the part that differed)."""


def _environment():
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-token masks in transformers):
    renders its body; the masks are not needed here."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def render(template: str, messages: list[dict], add_generation_prompt: bool,
           special_tokens: dict) -> str:
  """The template's text for `messages` ([{'role', 'content'}]), as apply_chat_template."""
  return _environment().from_string(template).render(
      messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
      documents=None, **special_tokens)


def conversation(prompt: str, answers: list[str], instructions: list[str]) -> list[dict]:
  """[user: prompt, assistant: answers[0], user: instructions[0], assistant: ...]."""
  messages = [dict(role='user', content=prompt)]
  for i, answer in enumerate(answers):
    messages.append(dict(role='assistant', content=answer))
    if i < len(instructions):
      messages.append(dict(role='user', content=instructions[i]))
  return messages


def _cut(text: str, start: str, end: str, what: str) -> str:
  """The text strictly between the first `start` (or the beginning) and `end`."""
  i = text.index(start) + len(start) if start else 0
  j = text.find(end, i)
  if j < 0:
    raise ChatTemplateError(f'chat template: {end!r} not found after {what}')
  return text[i:j]


def prompt_format(tok, template: str | None = None, turns: int = 3) -> PromptFormat:
  """The SCoRe PromptFormat of `tok`'s chat template (or `template`), checked for
  `turns` turns. Its stop piece is the end-of-turn token that follows an assistant turn."""
  template = template or getattr(tok, 'chat_template', None)
  if not template:
    raise ChatTemplateError('the tokenizer has no chat template (prompt_format="chat_template" '
                            'needs tokenizer_config.json chat_template or GGUF '
                            'tokenizer.chat_template)')
  special = tok.special_tokens
  answers = [f'{_ANSWER}{t}' for t in range(turns)]
  instructions = [f'{_INSTRUCTION}{t}' for t in range(turns - 1)]
  full = render(template, conversation(_PROMPT, answers, instructions), False, special)
  first = render(template, conversation(_PROMPT, [], []), True, special)
  if first.count(_PROMPT) != 1:
    raise ChatTemplateError('chat template: the user message does not appear once in its output')
  # After an answer: its end-of-turn token, then the next user turn up to the generation
  # prompt. The end of turn is the longest special token the gap starts with.
  gap = _cut(full, answers[0], instructions[0], 'the first answer')
  stops = sorted((t for t in _special_pieces(tok) if gap.startswith(t)), key=len)
  if not stops:
    raise ChatTemplateError(f'chat template: after an assistant turn comes {gap[:40]!r}, '
                            'which does not start with a special token to stop on')
  stop = stops[-1]
  turn2 = gap[len(stop):] + '{instruction}' + _cut(full, instructions[0], answers[1],
                                                   'the first instruction')
  expected = first + answers[0]  # Every later turn must be wrapped the same way.
  for t in range(1, turns):
    expected += stop + turn2.replace('{instruction}', instructions[t - 1]) + answers[t]
  if not full.startswith(expected):
    at = next(i for i, (a, b) in enumerate(zip(full, expected + '\0')) if a != b)
    raise ChatTemplateError(f'chat template renders turns inconsistently: at {at} it has '
                            f'{full[at:at + 60]!r}, a fixed per-turn format gives '
                            f'{expected[at:at + 60]!r}')
  escape = lambda s: s.replace('{', '{{').replace('}', '}}')  # PromptFormat uses str.format
  return PromptFormat(
      turn1=escape(first).replace(escape(_PROMPT), '{prompt}'),
      turn2=escape(turn2).replace('{{instruction}}', '{instruction}'),
      stop_pieces=(stop,))


def _special_pieces(tok) -> list[str]:
  """The special tokens of an HF tokenizer (end-of-turn markers are among them)."""
  return list(tok.special_tokens.values()) + tok.added_special_pieces()
