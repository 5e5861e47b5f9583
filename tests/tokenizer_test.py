"""SentencePiece wrapper: training, round-trip, digits, determinism, errors."""
import os

import numpy as np
import pytest

from score_jax.tasks import arithmetic as ar
from score_jax.tokenizer import Tokenizer


def _corpus(n=2000, seed=0):
  return list(ar.ArithmeticTask().corpus(np.random.default_rng(seed), n))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return Tokenizer.train(_corpus(), 96, tmp_path_factory.mktemp('tok') / 'a.model')


def test_special_ids_and_size(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 96


def test_round_trip_on_task_texts(tok):
  texts = _corpus(400, seed=1) + ['Answer  12.  Check', ' Add 1+2. ', 'so so']
  for text in texts:
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
  digit_ids = set()
  for d in '0123456789':
    ids = tok.encode(d)
    assert len(ids) == 1
    digit_ids.add(ids[0])
  assert len(digit_ids) == 10
  ids = tok.encode(ar.correct_response(947, 586))
  pieces = [tok.id_to_piece(i) for i in ids]
  assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces
  assert sum(i in digit_ids for i in ids) == sum(c.isdigit() for c in
                                                  ar.correct_response(947, 586))


def test_decode_stops_at_eos_and_skips_pad(tok):
  ids = tok.encode('Answer 933.')
  padded = [tok.pad_id] + ids[:2] + [tok.pad_id] + ids[2:] + [tok.eos_id] + ids
  assert tok.decode(padded) == 'Answer 933.'
  assert tok.decode(np.array(ids + [tok.eos_id, tok.pad_id])) == 'Answer 933.'
  assert tok.decode([tok.eos_id] + ids) == ''


def test_training_is_deterministic_and_atomic(tmp_path):
  a = Tokenizer.train(_corpus(), 64, tmp_path / 'a.model')
  b = Tokenizer.train(iter(_corpus()), 64, tmp_path / 'b.model')
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  assert a.encode('Add 347+586.') == b.encode('Add 347+586.')
  assert sorted(os.listdir(tmp_path)) == ['a.model', 'b.model']  # no temp files left
  loaded = Tokenizer.load(tmp_path / 'a.model')
  assert loaded.vocab_size == 64
  assert loaded.encode('Check 7+6=13') == a.encode('Check 7+6=13')


def test_missing_file_names_the_path(tmp_path):
  path = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match='nope.model'):
    Tokenizer.load(path)


def test_vocab_too_small_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='vocab_size=20'):
    Tokenizer.train(_corpus(200), 20, tmp_path / 'small.model')
  assert not os.listdir(tmp_path)


def test_chat_markers_are_single_pieces_and_missing_pieces_are_named(tmp_path):
  from score_jax.tasks import formats
  fmt = formats.get_prompt_format('gemma_chat')
  texts = [f'<start_of_turn>user\nAdd {i}+{i}.<end_of_turn>\n<start_of_turn>model\n{2 * i}'
           for i in range(200)]
  tok = Tokenizer.train(texts, 40, tmp_path / 'chat.model',
                        user_defined_symbols=fmt.special_pieces)
  end = tok.piece_id('<end_of_turn>')
  ids = tok.encode('<start_of_turn>user\nhi<end_of_turn>')
  assert ids[0] == tok.piece_id('<start_of_turn>') and ids[-1] == end
  assert formats.stop_ids(tok, fmt) == (tok.eos_id, end)
  plain = Tokenizer.train(texts, 40, tmp_path / 'plain.model')
  with pytest.raises(ValueError, match='no piece .<end_of_turn>.'):
    formats.stop_ids(plain, fmt)


def _hf_dir(path, config):
  """A small byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json."""
  import json
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(_corpus(400), trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<eos>', '<bos>', '<pad>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path)
  tk.save(str(path / 'tokenizer.json'))
  with open(path / 'tokenizer_config.json', 'w') as f:
    json.dump(config, f)
  return path


def test_load_tokenizer_picks_by_file(tmp_path, tok):
  from score_jax.tokenizer import HFTokenizer, MissingPieceError, load_tokenizer
  sp_dir = tmp_path / 'sp'
  Tokenizer.train(_corpus(), 64, sp_dir / 'tokenizer.model')
  assert isinstance(load_tokenizer(sp_dir), Tokenizer)
  assert isinstance(load_tokenizer(sp_dir / 'tokenizer.model'), Tokenizer)
  hf_dir = _hf_dir(tmp_path / 'hf', dict(eos_token='<eos>', bos_token='<bos>',
                                         add_bos_token=False))
  for path in (hf_dir, hf_dir / 'tokenizer.json'):
    hf = load_tokenizer(path)
    assert isinstance(hf, HFTokenizer)
  # No pad token named: EOS fills invalid slots; add_bos_token false: no BOS.
  assert (hf.eos_id, hf.pad_id, hf.bos_id) == (0, 0, None) and hf.vocab_size == 300
  text = ar.correct_response(947, 586)
  ids = hf.encode(text + '<eos>' + 'Add')  # special-token strings become their ids
  assert hf.eos_id in ids and hf.decode(ids) == text
  with pytest.raises(MissingPieceError, match="'<end_of_turn>'"):
    hf.piece_id('<end_of_turn>')
  assert load_tokenizer(_hf_dir(tmp_path / 'bos', dict(
      eos_token='<eos>', bos_token='<bos>', add_bos_token=True))).bos_id == 1
  with pytest.raises(FileNotFoundError, match='no tokenizer.json or tokenizer.model'):
    load_tokenizer(tmp_path)
