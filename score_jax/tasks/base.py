"""What a task is: a dataset, a prompt format, a correction instruction and a verifier.

The trainer only talks to tasks through `Task`, so adding a benchmark means adding one
module under `score_jax/tasks/` and one line to the registry in `__init__.py`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np


def merge_config(defaults: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """`defaults` updated by the user's task config; an unknown field (a typo) is an error
  that names it, instead of a silently ignored setting."""
  if config is not None:
    unknown = set(config.keys()) - set(defaults.keys())
    if unknown:
      raise ValueError(f'unknown {defaults.get("name", "task")} task fields {sorted(unknown)}; '
                       f'known: {sorted(defaults.keys())}')
    defaults.update(config)
  return defaults


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem. `prompt` is the bare problem text; `Task.prompt` formats it for turn 1."""
  id: str
  prompt: str
  answer: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
  """A self-correction task.

  Episode (SCORE.md): x1 = prompt(problem); y1 ~ pi(.|x1);
  x_t = [x_{t-1}, y_{t-1}, correction_instruction]; y_t ~ pi(.|x_t); rewards
  reward(y_t, problem).
  """

  name: str
  correction_instruction: str

  @abc.abstractmethod
  def train_problems(self, rng: np.random.Generator, n: int) -> list[Problem]:
    """`n` training problems drawn with `rng`; never one of `eval_problems`."""

  @abc.abstractmethod
  def eval_problems(self, n: int) -> list[Problem]:
    """The first `n` held-out problems, the same on every call."""

  @abc.abstractmethod
  def prompt(self, problem: Problem) -> str:
    """The full turn-1 text the model sees."""

  @abc.abstractmethod
  def reward(self, response_text: str, problem: Problem) -> float:
    """Binary oracle reward r(y, y*) in {0.0, 1.0}; malformed responses get 0.0."""

  def answer_key(self, response_text: str) -> str | None:
    """The response's final answer, normalised so that equal answers compare equal (for a
    majority vote over samples); None when it states none. Tasks whose answers cannot be
    voted on (programs) leave this unimplemented."""
    raise NotImplementedError(f'task {self.name!r} has no answer to vote on')

  def rewards(self, response_texts: Sequence[str], problems: Sequence[Problem]) -> np.ndarray:
    """Rewards of a batch, float32 [n]. Tasks with slow verifiers (sympy, a code sandbox)
    override this to verify in parallel worker processes with a per-item timeout."""
    return np.asarray([self.reward(t, p) for t, p in zip(response_texts, problems)], np.float32)

  def close(self):
    """Releases worker processes or files the task holds (called at the end of a run)."""

  def reward_stats(self) -> dict[str, float]:
    """Cumulative counts of the reward path since construction, logged every RL step, so a
    run that starts to game its verifier shows it: flat metric names (`hack_nonbuiltin`,
    `sandbox_timeouts`, `math_hedged`, `verifier_timeouts`, ...). {} when there are none."""
    return {}

  @abc.abstractmethod
  def corpus(self, rng: np.random.Generator, n: int) -> Iterator[str]:
    """`n` texts for training a tokenizer that covers everything this task shows the model."""

  def student(self, problem: Problem, rng: np.random.Generator) -> str:
    """One attempt of a simulated student: what an embedded base model learns from."""
    raise NotImplementedError(
        f'task {self.name!r} has no embedded base model; start from pretrained weights')

  def base_transcripts(self, rng: np.random.Generator, n: int,
                       turns: int = 2) -> list[tuple[Problem, list[str]]]:
    """(problem, attempts) pairs for supervised training of an embedded base model:
    `turns` independent student attempts, so a later attempt is a fresh try, not a
    correction (like a real base model, the result does not self-correct)."""
    return [(p, [self.student(p, rng) for _ in range(turns)])
            for p in self.train_problems(rng, n)]
