"""Imports DeepMind's `mathematics-dataset` 1.0.1 (2019) under numpy 2 and sympy >= 1.6.

The package is unmaintained; three things it uses are gone. Each patch is the smallest one
that restores the old behaviour, and touches only what the generator sees:

1. sympy moved `base_solution_linear` from `sympy.solvers.diophantine` (a module until
   sympy 1.5) to `sympy.solvers.diophantine.diophantine`; the package no longer re-exports
   it, so `sample/polynomials.py` fails at import. We re-export it from the package.
2. numpy 1.24 removed the alias `np.object` (it was the builtin `object`).
3. numpy 2.0 removed `ndarray.itemset(index, value)` (it was `a[index] = value` for a full
   integer index, which for object arrays stores the value as one element, as itemset did).
   (2) and (3) occur only in `sample/polynomials.py`. Rather than adding names to numpy
   for the whole process, that module's global `np` is replaced by a proxy that forwards
   everything to numpy but has `object`, and whose `zeros`/`empty` return an ndarray
   subclass with `itemset`. Everything else in the package runs unchanged.

`generator_modules(difficulty)` returns the flat `{name: sample_fn}` dict that the
package's own `generate.py` builds, without its absl flags.
"""
from __future__ import annotations

import functools
import importlib
import sys
import types

import numpy as np

DIFFICULTIES = ('train-easy', 'train-medium', 'train-hard', 'interpolate')
# The generator drops questions / answers longer than these (generate_settings.py).
MAX_QUESTION_LENGTH = 160
MAX_ANSWER_LENGTH = 30


class _ItemsetArray(np.ndarray):
  """ndarray with numpy 1's `itemset` (patch 3)."""

  def itemset(self, index, value):
    self[index] = value


def _with_itemset(make):
  @functools.wraps(make)
  def wrapped(*args, **kwargs):
    return make(*args, **kwargs).view(_ItemsetArray)
  return wrapped


class _NumpyCompat(types.ModuleType):
  """numpy as `sample/polynomials.py` expects it (patches 2 and 3)."""

  object = object
  zeros = staticmethod(_with_itemset(np.zeros))
  empty = staticmethod(_with_itemset(np.empty))

  def __getattr__(self, name):
    return getattr(np, name)


def _patch_sympy() -> None:
  """Patch 1: make `from sympy.solvers.diophantine import base_solution_linear` work."""
  importlib.import_module('sympy.solvers.diophantine')
  # `sympy.solvers.diophantine` as an attribute is the function `diophantine`, so take the
  # package from sys.modules.
  package = sys.modules['sympy.solvers.diophantine']
  if not hasattr(package, 'base_solution_linear'):
    impl = importlib.import_module('sympy.solvers.diophantine.diophantine')
    package.base_solution_linear = impl.base_solution_linear


@functools.cache
def _modules_module():
  """The package's `modules.modules`, imported once with the patches applied."""
  _patch_sympy()
  polynomials = importlib.import_module('mathematics_dataset.sample.polynomials')
  polynomials.np = _NumpyCompat('numpy_for_mathematics_dataset')
  return importlib.import_module('mathematics_dataset.modules.modules')


def _entropy_fn(level: int, num_levels: int):
  """generate.py's `_make_entropy_fn`: the level-th third of each entropy range."""
  def modify_entropy(range_):
    length = range_[1] - range_[0]
    return (range_[0] + level / num_levels * length,
            range_[0] + (level + 1) / num_levels * length)
  return modify_entropy


def _flatten(tree, prefix: str | None = None) -> dict:
  flat = {}
  for key, value in tree.items():
    name = key if prefix is None else f'{prefix}__{key}'
    flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
  return flat


@functools.cache
def generator_modules(difficulty: str) -> dict:
  """{'algebra__linear_1d': fn, ...} for a difficulty; fn() -> Problem(question, answer)."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f'unknown difficulty {difficulty!r}; known: {", ".join(DIFFICULTIES)}')
  modules = _modules_module()
  if difficulty == 'interpolate':
    tree = modules.test()
  else:
    tree = modules.train(_entropy_fn(DIFFICULTIES.index(difficulty), 3))
  return dict(sorted(_flatten(tree).items()))
