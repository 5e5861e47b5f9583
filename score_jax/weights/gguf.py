"""GGUF files (llama.cpp's format) -> our params, ModelConfig fields and tokenizer metadata.

The `gguf` package (maintained with llama.cpp) parses the file: metadata key/values and a
table of tensors, memory-mapped. Everything after that is ours: the tensors are renamed to
Hugging Face's names and laid out as torch's [out, in] (GGUF lists dimensions fastest
first, so the numpy view of a [in, out] GGUF tensor already is [out, in]), dequantized
here block by block (`dequantize`; the package's own `gguf.quants` is the independent
reference in the tests), and built into our tree by the shared recipes of
`weights/mapping.py`, one param at a time, straight onto its sharding.

Two llama.cpp conventions are undone:
- for the `llama` architecture the converter permutes the rows of q and k so that rotary
  pairs are interleaved (llama.cpp's "normal" rope); we, like transformers and HF's
  checkpoints, rotate halves, so the rows are permuted back (`unpermute_rows`). Qwen2/3
  files use llama.cpp's NEOX rope, which is already halves: nothing to undo;
- Llama 3.1/3.2's `llama3` rotary scaling is stored as a tensor of per-frequency factors
  (`rope_freqs.weight`), not as metadata: it is read back into the four llama3 fields and
  checked to reproduce those factors.

Supported: architectures `llama` (Llama 2/3, SmolLM2, Mistral 7B v0.2+ as llama.cpp
writes them), `qwen2`, `qwen3`; tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1. Anything else
is a `CheckpointImportError` that names it.
"""
import functools
import math
import os
from typing import Any

import numpy as np

from score_jax import model as model_lib
from score_jax.weights import mapping
from score_jax.weights.mapping import CheckpointImportError

ARCHITECTURES = ('llama', 'qwen2', 'qwen3')
BLOCK = 32  # elements per block of every supported quantisation


@functools.lru_cache(maxsize=2)
def open_gguf(path: str):
  """The parsed file (`gguf.GGUFReader`: memory-mapped tensors, metadata fields)."""
  import gguf  # Only GGUF imports need the package.
  if not os.path.isfile(path):
    raise CheckpointImportError(f'GGUF file not found: {path}')
  try:
    return gguf.GGUFReader(path, 'r')
  except Exception as e:  # The reader raises ValueError, struct.error, ... on bad bytes.
    raise CheckpointImportError(f'{path}: not a readable GGUF file: {type(e).__name__}: {e}') from e


def metadata(path: str) -> dict[str, Any]:
  """Every metadata key -> its value (numbers, strings, lists), tensors excluded."""
  return {k: f.contents() for k, f in open_gguf(path).fields.items()
          if not k.startswith('GGUF.')}


# -- dequantization ------------------------------------------------------------------------


def _f16(blocks_u8: np.ndarray, at: int) -> np.ndarray:
  """The float16 scale at byte `at` of each block, as float32 [blocks, 1]."""
  return blocks_u8[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs_u8: np.ndarray) -> np.ndarray:
  """16 bytes -> 32 4-bit values: element j is the low nibble of byte j, element 16 + j
  its high nibble (ggml's block_q4_0 / block_q4_1 layout)."""
  return np.concatenate([qs_u8 & 0x0F, qs_u8 >> 4], axis=1).astype(np.float32)


# type name -> (bytes per block of BLOCK elements or None for plain arrays, decoder).
_DECODERS = {
    'F32': (None, lambda raw: raw.view(np.float32)),
    'F16': (None, lambda raw: raw.view(np.float16).astype(np.float32)),
    # bfloat16 is the top half of a float32.
    'BF16': (None, lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)),
    # d (f16), 32 x int8: d * q
    'Q8_0': (34, lambda b: _f16(b, 0) * b[:, 2:].copy().view(np.int8).astype(np.float32)),
    # d (f16), 16 bytes of nibbles: d * (q - 8)
    'Q4_0': (18, lambda b: _f16(b, 0) * (_nibbles(b[:, 2:]) - 8)),
    # d (f16), m (f16), 16 bytes of nibbles: d * q + m
    'Q4_1': (20, lambda b: _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2)),
}
SUPPORTED_TYPES = tuple(_DECODERS)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
  """A tensor's raw bytes (any dtype view) -> float32 of `shape` (numpy order)."""
  if type_name not in _DECODERS:
    raise CheckpointImportError(f'GGUF tensor type {type_name} is not supported; supported: '
                                f'{SUPPORTED_TYPES}')
  block_bytes, decode = _DECODERS[type_name]
  raw_u8 = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
  if block_bytes is None:
    return decode(raw_u8).reshape(shape)
  if shape[-1] % BLOCK or raw_u8.size != math.prod(shape) // BLOCK * block_bytes:
    raise CheckpointImportError(f'{type_name} tensor of shape {list(shape)}: {raw_u8.size} bytes '
                                f'do not hold whole blocks of {BLOCK} ({block_bytes} bytes each)')
  return decode(raw_u8.reshape(-1, block_bytes)).reshape(shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation (`convert_hf_to_gguf.LlamaModel.permute`):
  per head, rows (pair i, member j) back to (member j, pair i), i.e. rotary halves."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- names ---------------------------------------------------------------------------------

_GLOBAL_NAMES = {'token_embd.weight': mapping.EMBED, 'output_norm.weight': 'model.norm.weight',
                 'output.weight': mapping.LM_HEAD}
_LAYER_NAMES = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
                'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm',
                'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
ROPE_FREQS = 'rope_freqs.weight'  # llama3 scaling factors, not a param


def hf_name(name: str) -> str:
  """GGUF tensor name -> the HF name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split('.')
  if len(parts) == 4 and parts[0] == 'blk' and parts[2] in _LAYER_NAMES:
    return f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}'
  raise CheckpointImportError(f'GGUF tensor {name!r} has no known Hugging Face name')


def tensor_table(path: str) -> dict[str, Any]:
  """HF name -> the file's tensor (name, tensor_type, numpy-order shape, raw data)."""
  table = {}
  for t in open_gguf(path).tensors:
    if t.name == ROPE_FREQS:
      continue
    if t.tensor_type.name not in _DECODERS:
      raise CheckpointImportError(f'{path}: tensor {t.name} is {t.tensor_type.name}; supported '
                                  f'tensor types: {SUPPORTED_TYPES}')
    table[hf_name(t.name)] = t
  return table


def _shape(t) -> tuple[int, ...]:
  return tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first


# -- config --------------------------------------------------------------------------------


def architecture(meta: dict) -> str:
  arch = meta.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise CheckpointImportError(f'GGUF architecture {arch!r} is not supported; supported: '
                                f'{ARCHITECTURES}')
  return arch


def _float32_value(x) -> float:
  """GGUF stores floats as float32: 1e-5 arrives as 9.99999974e-06; keep the shortest
  decimal that is the same float32, so configs compare equal to the published ones."""
  return float(str(np.float32(x)))


def model_config_from_gguf(path: str) -> dict:
  """ModelConfig field values from the file's metadata (and its tensor list)."""
  meta = metadata(path)
  arch = architecture(meta)
  get = lambda key, default=None: meta.get(f'{arch}.{key}', default)
  heads, kv_heads = get('attention.head_count'), get('attention.head_count_kv')
  if isinstance(kv_heads, list) or isinstance(heads, list):
    raise CheckpointImportError(f'{path}: per-layer head counts are not supported')
  embed = int(get('embedding_length'))
  tensors = {t.name: t for t in open_gguf(path).tensors}
  vocab = get('vocab_size') or len(meta.get('tokenizer.ggml.tokens', ())) or \
      _shape(tensors['token_embd.weight'])[0]
  out = dict(vocab_size=int(vocab), embed_dim=embed, hidden_dim=int(get('feed_forward_length')),
             num_layers=int(get('block_count')), num_heads=int(heads),
             num_kv_heads=int(kv_heads or heads),
             head_dim=int(get('attention.key_length') or embed // int(heads)),
             rope_base=int(get('rope.freq_base', 10_000.0)),
             norm_eps=_float32_value(get('attention.layer_norm_rms_epsilon', 1e-5)),
             mlp_activation='silu', norm_plus_one=False, scale_embeddings=False,
             tie_embeddings='output.weight' not in tensors, qkv_bias=arch == 'qwen2',
             use_qk_norm=arch == 'qwen3')
  scaling = get('rope.scaling.type', 'none')
  if scaling == 'linear':
    out['rope_scale_factor'] = float(get('rope.scaling.factor'))
  elif scaling != 'none':
    raise CheckpointImportError(f'{path}: rotary scaling {scaling!r} is not supported')
  if ROPE_FREQS in tensors:
    factors = dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type.name,
                         _shape(tensors[ROPE_FREQS]))
    out.update(_llama3_from_factors(factors, out['rope_base'], out['head_dim'],
                                    get('rope.scaling.original_context_length') or 8192))
  if get('attention.sliding_window'):
    raise CheckpointImportError(f'{path}: a sliding window in a {arch} GGUF is not supported')
  return out


def _llama3_from_factors(factors: np.ndarray, base: int, head_dim: int, original: int) -> dict:
  """The llama3 fields whose per-frequency factors (llama.cpp: base frequency / factor)
  are `factors`: factor = the largest, low/high frequency factors llama's 1 and 4."""
  fields = dict(rope_llama3_factor=float(factors.max()), rope_llama3_low_freq_factor=1.0,
                rope_llama3_high_freq_factor=4.0, rope_llama3_original_max_len=int(original))
  timescale = base ** (2 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)
  scaled = model_lib.llama3_timescale(timescale, *list(fields.values()))
  if not np.allclose(np.asarray(scaled) / timescale, factors.reshape(-1), rtol=1e-4):
    raise CheckpointImportError(f'rope_freqs.weight {factors.tolist()} is not llama3 rotary '
                                f'scaling with {fields}')
  return fields


# -- loading -------------------------------------------------------------------------------


def load_gguf(path: str, model_config: model_lib.ModelConfig, shardings=None, dtype=None,
              abstract=None) -> Any:
  """Params for `model_config` from a GGUF file, dequantized to `dtype` (default
  `model_config.param_dtype`); `shardings`, `abstract` as `hf.load_safetensors`."""
  if abstract is None:
    abstract = mapping.abstract_params(model_config)
  arch = architecture(metadata(path))
  table = tensor_table(path)
  plans = mapping.plan({k: _shape(t) for k, t in table.items()}, abstract)
  rows_per_head = {'self_attn.q_proj.weight': model_config.num_heads,
                   'self_attn.k_proj.weight': model_config.num_kv_heads}

  def read(name: str) -> np.ndarray:
    t = table[name]
    x = dequantize(t.data, t.tensor_type.name, _shape(t))
    heads = rows_per_head.get(name.split('.', 3)[-1]) if arch == 'llama' else None
    return unpermute_rows(x, heads) if heads else x

  return mapping.build_params(plans, read, abstract, shardings,
                              dtype or model_config.param_dtype)
