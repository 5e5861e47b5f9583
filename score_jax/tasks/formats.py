"""Prompt formats: how turn 1 and the correction instruction wrap a task's text.

A format is text only; `stop_ids` turns its stop pieces into token ids for the sampler.
"""
import dataclasses

from score_jax.tasks.base import Problem, Task


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How turn 1 and the correction instruction are wrapped around the task's text.

  The embedded task uses plain newlines; instruction-tuned checkpoints wrap the same
  texts in their chat markers and stop a turn at their end-of-turn piece.
  """
  turn1: str = "{prompt}\n"
  turn2: str = "\n{instruction}\n"
  stop_pieces: tuple[str, ...] = ()  # Besides EOS: pieces that end a model turn.
  special_pieces: tuple[str, ...] = ()  # Single tokens in the tokenizer (markers).

  def prompt_text(self, task: Task, problem: Problem) -> str:
    return self.turn1.format(prompt=task.prompt(problem))

  def instruction_text(self, task: Task) -> str:
    return self.turn2.format(instruction=task.correction_instruction)


# Gemma's instruction-tuned conversation: y1 ends with the model's <end_of_turn> (a stop
# token the sampler keeps in y1), so turn 2 opens with the newline that follows it.
_GEMMA_MARKERS = ("<start_of_turn>", "<end_of_turn>")
PROMPT_FORMATS = {
    "plain": PromptFormat(),
    "gemma_chat": PromptFormat(
        turn1="<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
        turn2="\n<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n",
        stop_pieces=("<end_of_turn>",), special_pieces=_GEMMA_MARKERS),
}


def get_prompt_format(name: str) -> PromptFormat:
  if name not in PROMPT_FORMATS:
    raise ValueError(f"unknown prompt format {name!r}; known: {sorted(PROMPT_FORMATS)}")
  return PROMPT_FORMATS[name]


def stop_ids(tok, fmt: PromptFormat) -> tuple[int, ...]:
  """Token ids that end a turn: EOS and the format's stop pieces (which must exist)."""
  return (tok.eos_id,) + tuple(tok.piece_id(p) for p in fmt.stop_pieces)
