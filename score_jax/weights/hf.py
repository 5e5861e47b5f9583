"""Hugging Face safetensors (Gemma 1/2/3, Llama, SmolLM2, Mistral, Qwen2/3) -> our param tree.

Streaming: the safetensors header is parsed here (8-byte little-endian length, JSON table
of name -> dtype/shape/byte range, raw little-endian data), and each parameter of ours is
built from its HF tensors read with `readinto` into a fresh buffer, converted (transpose,
cast to `param_dtype`), placed on its target sharding and dropped before the next one is
read. Host memory therefore peaks at the placed params (on a CPU backend they ARE host
memory) plus about two copies of the largest parameter, never twice the checkpoint; no
`mmap`, whose touched pages would count towards RSS until unmapped.

Which HF tensors build which param of ours (and back, for export) is `weights/mapping.py`;
config.json <-> ModelConfig is `weights/hf_config.py`. This module is the file format.
"""
import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from score_jax import model as model_lib
from score_jax.weights import mapping
# Re-exported: callers import the HF path's names from here.
from score_jax.weights.hf_config import model_config_from_hf  # noqa: F401
from score_jax.weights.mapping import CheckpointImportError, abstract_params  # noqa: F401

_DTYPES = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}
# Gemma 3 checkpoints of the multimodal model keep the text decoder under a prefix
# (`language_model.model.` before transformers 4.50, `model.language_model.` after).
_TEXT_PREFIXES = (('language_model.model.', 'model.'), ('model.language_model.', 'model.'),
                  ('language_model.lm_head.', 'lm_head.'))
# The image tower of the multimodal checkpoints: not part of a text import, so not
# "unexpected" either.
_IGNORED_PREFIXES = ('vision_tower.', 'multi_modal_projector.', 'model.vision_tower.',
                     'model.multi_modal_projector.')


# -- safetensors files ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: Any  # numpy dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offsets in `file`
  end: int


def read_header(file: str) -> dict[str, TensorInfo]:
  """Tensor table of one .safetensors file; raises CheckpointImportError naming the file if corrupt."""
  if not os.path.isfile(file):
    raise CheckpointImportError(f'safetensors file not found: {file}')
  size = os.path.getsize(file)
  with open(file, 'rb') as f:
    raw_len = f.read(8)
    if len(raw_len) < 8:
      raise CheckpointImportError(f'{file}: not a safetensors file ({size} bytes, no header length)')
    n = int.from_bytes(raw_len, 'little')
    if n > size - 8 or n > 100 << 20:
      raise CheckpointImportError(f'{file}: corrupt header: header length {n} exceeds file size {size}')
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointImportError(f'{file}: corrupt header: not JSON ({e})') from e
  if not isinstance(header, dict):
    raise CheckpointImportError(f'{file}: corrupt header: expected a JSON object')
  data_start, table = 8 + n, {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype, shape, (begin, end) = entry['dtype'], tuple(entry['shape']), entry['data_offsets']
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointImportError(f'{file}: corrupt header entry for {name!r}: {entry!r}') from e
    if dtype not in _DTYPES:
      raise CheckpointImportError(f'{file}: tensor {name!r} has unsupported dtype {dtype!r}')
    np_dtype = np.dtype(_DTYPES[dtype])
    nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
      raise CheckpointImportError(
          f'{file}: corrupt header: tensor {name!r} ({dtype}{list(shape)}, {nbytes} bytes) has '
          f'byte range [{begin}, {end}) in a data section of {size - data_start} bytes')
    table[name] = TensorInfo(file, np_dtype, shape, data_start + begin, data_start + end)
  return table


def read_tensor(info: TensorInfo) -> np.ndarray:
  """One tensor into a fresh (anonymous) host buffer."""
  out = np.empty(info.shape, info.dtype)
  with open(info.file, 'rb') as f:
    f.seek(info.begin)
    got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
  if got != info.end - info.begin:
    raise CheckpointImportError(f'{info.file}: truncated: read {got} of {info.end - info.begin} bytes')
  return out


def checkpoint_files(path: str) -> list[str]:
  """The .safetensors files of a checkpoint: a file, or a directory (sharded or single)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise CheckpointImportError(f'checkpoint path not found: {path}')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise CheckpointImportError(f'{index}: no "weight_map" object')
    files = sorted(set(weight_map.values()))
    missing = [fn for fn in files if not os.path.isfile(os.path.join(path, fn))]
    if missing:
      raise CheckpointImportError(f'{index} names files that do not exist in {path}: {missing}')
    return [os.path.join(path, fn) for fn in files]
  single = os.path.join(path, 'model.safetensors')
  if os.path.isfile(single):
    return [single]
  raise CheckpointImportError(f'{path}: neither model.safetensors nor model.safetensors.index.json')


def tensor_table(path: str) -> dict[str, TensorInfo]:
  """HF name (text prefixes stripped, image tower dropped) -> where its bytes are."""
  table = {}
  for file in checkpoint_files(path):
    for name, info in read_header(file).items():
      if name.startswith(_IGNORED_PREFIXES):
        continue
      for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
          name = new + name[len(old):]
          break
      if name in table:
        raise CheckpointImportError(f'tensor {name!r} is in both {table[name].file} and {file}')
      table[name] = info
  return table


# -- loading -------------------------------------------------------------------------------


def _check_tied(table: dict[str, TensorInfo], chunk_bytes: int = 64 << 20):
  """A tied model's checkpoint may still hold `lm_head.weight`; it must equal the embedding
  (compared in chunks, never two whole copies of a 256k-row matrix in memory)."""
  head, emb = table.get(mapping.LM_HEAD), table[mapping.EMBED]
  if head is None:
    return
  untied = ('the model config ties its unembedding (tie_embeddings=True); for an untied '
            'checkpoint set tie_embeddings=False')
  if head.shape != emb.shape:
    raise CheckpointImportError(f'lm_head.weight {list(head.shape)} differs in shape from '
                                f'model.embed_tokens.weight {list(emb.shape)}: {untied}')
  row_bytes = int(np.prod(emb.shape[1:])) * emb.dtype.itemsize
  rows = max(1, chunk_bytes // max(row_bytes, 1))
  with open(head.file, 'rb') as fh, open(emb.file, 'rb') as fe:
    for r0 in range(0, emb.shape[0], rows):
      n = min(rows, emb.shape[0] - r0) * row_bytes
      fh.seek(head.begin + r0 * row_bytes)
      fe.seek(emb.begin + r0 * row_bytes)
      a = np.frombuffer(fh.read(n), head.dtype)
      b = np.frombuffer(fe.read(n), emb.dtype)
      if not np.array_equal(a.astype(np.float32), b.astype(np.float32)):
        raise CheckpointImportError(f'lm_head.weight differs from model.embed_tokens.weight: '
                                    f'{untied}')


def load_safetensors(path: str, model_config: model_lib.ModelConfig, shardings=None,
                     dtype=None, abstract=None) -> Any:
  """Params for `model_config` from an HF checkpoint (directory or single file).

  `shardings`: None (default device), one Sharding for all, or a tree like the params
  (e.g. `sharding.param_shardings`). `dtype` overrides `model_config.param_dtype`.
  `abstract`: the expected param tree (ShapeDtypeStructs); default the model's own.
  """
  if abstract is None:
    abstract = abstract_params(model_config)
  table = tensor_table(path)
  ignored = frozenset()
  if model_config.tie_embeddings and mapping.EMBED in table:
    _check_tied(table)
    ignored = frozenset([mapping.LM_HEAD])
  plans = mapping.plan({k: v.shape for k, v in table.items()}, abstract, ignored)
  return mapping.build_params(plans, lambda name: read_tensor(table[name]), abstract,
                              shardings, dtype or model_config.param_dtype)


_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(tensors: dict[str, np.ndarray], file: str):
  """The format `read_header` reads: 8-byte little-endian header length, the JSON table
  (with transformers' `format: pt` metadata), then each tensor's bytes in name order.
  Written to a temporary name and renamed, so a killed export leaves no half file."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  names = sorted(tensors)
  for name in names:
    x = tensors[name]
    header[name] = dict(dtype=_NAMES[x.dtype], shape=list(x.shape),
                        data_offsets=[offset, offset + x.nbytes])
    offset += x.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # The data section starts 8-byte aligned.
  tmp = file + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little') + raw)
    for name in names:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  os.replace(tmp, file)


def load_config(path: str) -> dict:
  """`model_config_from_hf` of the `config.json` in checkpoint directory `path`."""
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointImportError(f'no config.json in {path}')
  with open(file) as f:
    return model_config_from_hf(json.load(f))
