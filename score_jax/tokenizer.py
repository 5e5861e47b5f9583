"""Tokenizers: SentencePiece (the embedded task, Gemma) and Hugging Face `tokenizers` (BPE
models: tokenizer.json, or built from a GGUF file's metadata), behind one interface.

Both give encode(text) -> ids without BOS/EOS (special-token strings in the text become
their ids), decode(ids) up to the first EOS, bos_id / eos_id / pad_id / unk_id,
vocab_size and piece_id(piece). `load_tokenizer(path)` picks one by the file.

SentencePiece ids for models trained here: pad=0, unk=1, bos=2, eos=3. Special ids are
read from the model file, never assumed, so Gemma's tokenizer.model loads the same way.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm


class MissingPieceError(ValueError):
  """A piece that must be one token (a stop marker) is not in the vocabulary."""


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
      raise MissingPieceError(f'the tokenizer has no piece {piece!r} (needed as a single token)')
    return i

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


# -- Hugging Face tokenizers ---------------------------------------------------------------

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (llama.cpp's names): the
# regexes of the models' own tokenizer.json files (as transformers' GGUF loader and
# llama.cpp's llama-vocab.cpp spell them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_pre_tokenizer(pre: str):
  """The `tokenizers` pre-tokenizer of GGUF `tokenizer.ggml.pre` = `pre`."""
  from tokenizers import Regex, pre_tokenizers as pt
  if pre in ('default', 'gpt-2', 'gpt2'):  # GPT-2's own regex inside ByteLevel
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == 'smollm':  # llama.cpp: "\p{N}" first, then GPT-2's regex (SmolLM2's tokenizer.json)
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  split = {'llama-bpe': _LLAMA3_SPLIT, 'llama3': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}.get(pre)
  if split is None:
    raise ValueError(f'GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: default, '
                     'gpt-2, smollm, llama-bpe, qwen2')
  return pt.Sequence([pt.Split(Regex(split), behavior='isolated'),
                      pt.ByteLevel(add_prefix_space=False, use_regex=False)])


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

  bos_id is what a prompt should start with: None when the model has no BOS, does not add
  one (`add_bos_token` false), or its chat template already writes it. pad_id only fills
  invalid slots (validity masks say what is real), so it may be a real token: the pad
  token if the model names one, else EOS. decode() keeps special tokens other than EOS
  (transcripts show what the model wrote) and skips no pad: callers pass valid tokens.
  """

  def __init__(self, tokenizer, special_tokens: dict, add_bos: bool,
               chat_template: str | None = None):
    self._tk = tokenizer
    self.add_bos = add_bos
    self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
    self.chat_template = chat_template
    ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
    for k, v in self.special_tokens.items():
      if ids[k] is None:
        raise MissingPieceError(f'{k} {v!r} is not in the vocabulary')
    self.eos_id = ids.get('eos_token')
    self.unk_id = ids.get('unk_token')
    self.pad_id = ids.get('pad_token', self.eos_id if self.eos_id is not None else 0)
    self.bos_id = ids.get('bos_token') if add_bos else None
    if self.bos_id is not None and chat_template:
      from score_jax import chat_template as chat  # The template decides, rendered.
      if chat.render(chat_template, [dict(role='user', content='x')], True,
                     self.special_tokens).startswith(self.special_tokens['bos_token']):
        self.bos_id = None

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> 'HFTokenizer':
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, transformers 5)."""
    from tokenizers import Tokenizer as TkTokenizer
    path = os.fspath(path)
    file = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(file):
      raise FileNotFoundError(f'no tokenizer.json in {path}')
    tk = TkTokenizer.from_file(file)
    config = {}
    if os.path.isfile(os.path.join(path, 'tokenizer_config.json')):
      with open(os.path.join(path, 'tokenizer_config.json')) as f:
        config = json.load(f)
    template = config.get('chat_template')
    if os.path.isfile(os.path.join(path, 'chat_template.jinja')):
      with open(os.path.join(path, 'chat_template.jinja')) as f:
        template = f.read()
    content = lambda t: t.get('content') if isinstance(t, dict) else t
    special = {k: content(config.get(k)) for k in
               ('bos_token', 'eos_token', 'pad_token', 'unk_token')}
    add_bos = config.get('add_bos_token')
    if add_bos is None:  # What the tokenizer's post-processor does when asked for specials.
      bos = special['bos_token']
      add_bos = bos is not None and tk.encode('a').ids[:1] == [tk.token_to_id(bos)]
    return cls(tk, special, bool(add_bos), template)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> 'HFTokenizer':
    """The byte-level BPE a GGUF file describes (`tokenizer.ggml.*`), as llama.cpp reads it."""
    from tokenizers import AddedToken, Tokenizer as TkTokenizer, decoders, models
    from score_jax.weights import gguf
    meta = gguf.metadata(os.fspath(path))
    kind = meta.get('tokenizer.ggml.model')
    if kind != 'gpt2':
      raise ValueError(f'{path}: GGUF tokenizer.ggml.model={kind!r} is not supported (only '
                       "'gpt2', byte-level BPE)")
    tokens, types = meta['tokenizer.ggml.tokens'], meta.get('tokenizer.ggml.token_type') or []
    pre = meta.get('tokenizer.ggml.pre', 'default')
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(' ', 1)) for m in meta['tokenizer.ggml.merges']],
                     # llama.cpp looks a whole Llama-3 pre-token up before merging, as
                     # Llama 3's tokenizer.json (`ignore_merges`) does.
                     ignore_merges=pre in ('llama-bpe', 'llama3'))
    tk = TkTokenizer(bpe)
    tk.pre_tokenizer = gguf_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special, user-defined ones (4) matched whole but not
    # special: llama.cpp's token types.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == 4])
    token = lambda key: (tokens[meta[key]] if key in meta else None)
    special = dict(bos_token=token('tokenizer.ggml.bos_token_id'),
                   eos_token=token('tokenizer.ggml.eos_token_id'),
                   pad_token=token('tokenizer.ggml.padding_token_id'),
                   unk_token=token('tokenizer.ggml.unknown_token_id'))
    return cls(tk, special, bool(meta.get('tokenizer.ggml.add_bos_token', False)),
               meta.get('tokenizer.chat_template'))

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS; special-token strings become their ids."""
    return self._tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to (not including) the first EOS."""
    out = []
    for i in ids:
      if int(i) == self.eos_id:
        break
      out.append(int(i))
    return self._tk.decode(out, skip_special_tokens=False)

  def piece_id(self, piece: str) -> int:
    i = self._tk.token_to_id(piece)
    if i is None:
      raise MissingPieceError(f'the tokenizer has no piece {piece!r} (needed as a single token)')
    return i

  def id_to_piece(self, i: int) -> str:
    return self._tk.id_to_token(int(i))

  def added_special_pieces(self) -> list[str]:
    """Every special added token (`<|im_end|>`, `<|eot_id|>`, ...)."""
    return [t.content for t in self._tk.get_added_tokens_decoder().values() if t.special]

  def save(self, directory: str | os.PathLike):
    """tokenizer.json + tokenizer_config.json (special tokens, add_bos_token, chat template),
    which transformers' AutoTokenizer and `from_dir` read back."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._tk.save(os.path.join(directory, 'tokenizer.json'))
    config = dict(self.special_tokens, add_bos_token=self.add_bos,
                  add_eos_token=False, tokenizer_class='PreTrainedTokenizerFast')
    if self.chat_template:
      config['chat_template'] = self.chat_template
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
  """By the file: a .gguf file (its metadata), a tokenizer.json or a directory holding one
  (HF tokenizers), a SentencePiece .model file or a directory holding tokenizer.model."""
  path = os.fspath(path)
  if path.endswith('.gguf'):
    return HFTokenizer.from_gguf(path)
  if os.path.basename(path) == 'tokenizer.json':
    return HFTokenizer.from_dir(os.path.dirname(path) or '.')
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, 'tokenizer.json')):
      return HFTokenizer.from_dir(path)
    if os.path.isfile(os.path.join(path, 'tokenizer.model')):
      return Tokenizer.load(os.path.join(path, 'tokenizer.model'))
    raise FileNotFoundError(f'{path}: no tokenizer.json or tokenizer.model in this directory')
  return Tokenizer.load(path)
