"""A tensorflow-datasets builder that turns the user's local MATH files into ArrayRecord.

Why: ArrayRecord supports random access without TensorFlow (`as_data_source()`), so the
trainer can index problems directly and many hosts can read the same files. Nothing is
downloaded; the builder reads either layout that `score_jax/tasks/math.py` reads.

Build once (TensorFlow is not needed; tested with tensorflow-datasets 4.9.10,
array-record 0.8.6):

  python -m score_jax.tasks.math_tfds --train_path=MATH/train --eval_path=math500.jsonl \
      --data_dir=/data/tfds

then use the task with `format='tfds', tfds_data_dir='/data/tfds'`. Splits: `train`
(from train_path) and `test` (from eval_path). Each example keeps its position in the
source (`index`), because ArrayRecord shards are written in hashed-key order and
`eval_problems(n)` must be the first n problems of the source.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from score_jax.tasks import math as math_task
from score_jax.tasks.base import Problem

NAME = 'score_math'
_TEXT_FIELDS = ('id', 'problem', 'answer', 'solution', 'subject')


class ScoreMath(tfds.core.GeneratorBasedBuilder):
  """MATH problems from local files (original release or JSONL) -> ArrayRecord."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'MATH problems with reference answers from local files.'}

  def __init__(self, *, train_path: str = '', eval_path: str = '', source_format: str = 'auto',
               **kwargs):
    self._sources = {'train': train_path, 'test': eval_path}
    self._source_format = source_format
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {f: tfds.features.Text() for f in _TEXT_FIELDS}
    features['level'] = tfds.features.Scalar(dtype=np.int32, doc='1..5; -1 if unknown')
    features['index'] = tfds.features.Scalar(dtype=np.int64, doc='position in the source')
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    splits = {s: self._generate_examples(s) for s, p in self._sources.items() if p}
    if not splits:
      raise ValueError('ScoreMath needs train_path and/or eval_path to build')
    return splits

  def _generate_examples(self, split: str):
    path = self._sources[split]
    fmt = math_task.resolve_format(self._source_format, path, '')
    for i, p in enumerate(math_task.load_split(fmt, path, '', split)):
      yield f'{i:08d}', {'id': p.id, 'problem': p.prompt, 'answer': p.answer,
                         'solution': p.meta['solution'], 'subject': p.meta['subject'],
                         'level': -1 if p.meta['level'] is None else p.meta['level'],
                         'index': i}


def build(data_dir: str, train_path: str = '', eval_path: str = '',
          source_format: str = 'auto') -> ScoreMath:
  """Writes the ArrayRecord dataset under `data_dir` (a no-op if it already exists)."""
  builder = ScoreMath(train_path=train_path, eval_path=eval_path, source_format=source_format,
                      data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return builder


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def read_split(data_dir: str, split: str) -> list[Problem]:
  """All problems of `split` in source order, read without TensorFlow."""
  if not data_dir or not os.path.isdir(os.path.join(data_dir, NAME)):
    raise FileNotFoundError(f'no {NAME} dataset under tfds_data_dir={data_dir!r}; build it '
                            f'with `python -m score_jax.tasks.math_tfds`')
  builder = ScoreMath(data_dir=data_dir, file_format='array_record')
  sources = builder.as_data_source()
  if split not in sources:
    raise ValueError(f'the {NAME} dataset in {data_dir!r} has no {split!r} split '
                     f'(has {sorted(sources)})')
  source = sources[split]
  records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r['index']))
  return [Problem(id=_as_str(r['id']), prompt=_as_str(r['problem']),
                  answer=_as_str(r['answer']),
                  meta={'level': None if int(r['level']) < 0 else int(r['level']),
                        'subject': _as_str(r['subject']), 'solution': _as_str(r['solution'])})
          for r in records]


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  builder = build(f.data_dir, f.train_path, f.eval_path, f.source_format)
  print(f'wrote {builder.data_dir}: ' +
        ', '.join(f'{s}={len(v)}' for s, v in builder.as_data_source().items()))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('data_dir', None, 'where to write the dataset', required=True)
  flags.DEFINE_string('train_path', '', 'MATH train split directory or .jsonl file')
  flags.DEFINE_string('eval_path', '', 'MATH test split directory or .jsonl file (MATH500)')
  flags.DEFINE_enum('source_format', 'auto', ['auto', 'math_json', 'jsonl'], 'source layout')
  app.run(main)
