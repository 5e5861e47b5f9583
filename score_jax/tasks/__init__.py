"""Task registry: `get_task(config)` builds the task named by `config.name`."""
from __future__ import annotations

import importlib

import ml_collections

from score_jax.tasks.base import Problem, Task

# name -> 'module:Class'. Imported lazily so that a task with heavy dependencies (datasets,
# a code sandbox) costs nothing unless it is used. Each class takes the task ConfigDict.
_REGISTRY: dict[str, str] = {
    'arithmetic': 'score_jax.tasks.arithmetic:ArithmeticTask',
    'school_math': 'score_jax.tasks.school_math:SchoolMathTask',
    'math': 'score_jax.tasks.math:MathTask',
    'mbpp': 'score_jax.tasks.code:MBPPTask',
    'humaneval': 'score_jax.tasks.code:HumanEvalTask',
}


def known_tasks() -> list[str]:
  return sorted(_REGISTRY)


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The task named `config.name`, configured by the other fields of `config`."""
  name = config.get('name')
  if name not in _REGISTRY:
    raise ValueError(f'unknown task {name!r}; known tasks: {", ".join(known_tasks())}')
  module_name, class_name = _REGISTRY[name].split(':')
  cls = getattr(importlib.import_module(module_name), class_name)
  return cls(config)


__all__ = ['Problem', 'Task', 'get_task', 'known_tasks']
