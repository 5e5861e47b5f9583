"""SentencePiece tokenizer: trained in-process for the embedded task, or Gemma's model file.

Ids for models trained here: pad=0, unk=1, bos=2, eos=3. Special ids are
read from the model file, never assumed, so Gemma's tokenizer.model loads the same way.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
  """Thin wrapper over `sentencepiece.SentencePieceProcessor`."""

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model file not found: {path}')
    with open(path, 'rb') as f:
      return cls(spm.SentencePieceProcessor(model_proto=f.read()))

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
            model_type: str = 'bpe',
            user_defined_symbols: Sequence[str] = ()) -> 'Tokenizer':
    """Trains on `texts`, writes `model_path` atomically and returns the tokenizer.

    Deterministic: one thread and no sampling/shuffling of the input, so the same texts
    give the same model bytes. `user_defined_symbols` (e.g. chat markers) are always
    single pieces, as Gemma's `<start_of_turn>` is in its tokenizer. Normalisation is the identity and whitespace is kept as
    is, so decode(encode(s)) == s for any text built from the corpus characters.
    """
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts),
          model_writer=model,
          vocab_size=vocab_size,
          model_type=model_type,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3,
          user_defined_symbols=list(user_defined_symbols),
          split_digits=True,  # One token per digit: column arithmetic needs them.
          character_coverage=1.0,
          normalization_rule_name='identity',
          add_dummy_prefix=False,
          remove_extra_whitespaces=False,
          # Determinism: use every sentence, in order, on one thread.
          num_threads=1,
          input_sentence_size=0,
          shuffle_input_sentence=False,
          minloglevel=2,
      )
    except RuntimeError as e:
      msg = str(e)
      if 'Vocabulary size' in msg or 'vocab_size' in msg:
        raise ValueError(
            f'cannot train a {model_type} tokenizer with vocab_size={vocab_size} on this '
            f'corpus: {msg.strip()}') from e
      raise
    model_path = os.fspath(model_path)
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tokenizer-', suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(model.getvalue())
      os.replace(tmp, model_path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return cls.load(model_path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to (not including) the first EOS; pads are skipped."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != self.pad_id:
        out.append(i)
    return self._sp.decode(out)

  def piece_id(self, piece: str) -> int:
    """Id of a piece that must exist as one token (a stop marker, say)."""
    i = self._sp.piece_to_id(piece)
    if i == self.unk_id and piece != self.id_to_piece(self.unk_id):
      raise ValueError(f'the tokenizer has no piece {piece!r} (needed as a single token)')
    return i

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))
