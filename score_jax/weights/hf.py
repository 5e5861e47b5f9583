"""Hugging Face Gemma / Gemma 2 / Gemma 3 (text) safetensors -> our Gemma param tree.

Streaming: the safetensors header is parsed here (8-byte little-endian length, JSON table
of name -> dtype/shape/byte range, raw little-endian data), and each parameter of ours is
built from its HF tensors read with `readinto` into a fresh buffer, converted (transpose,
cast to `param_dtype`), placed on its target sharding and dropped before the next one is
read. Host memory therefore peaks at the placed params (on a CPU backend they ARE host
memory) plus about two copies of the largest parameter, never twice the checkpoint; no
`mmap`, whose touched pages would count towards RSS until unmapped.

The expected tree is the model's own (`jax.eval_shape` of its init), so this module never
restates which params a ModelConfig has; it says only where each of them comes from in HF.
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from score_jax import model as model_lib
from score_jax import sharding as sharding_lib

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


class CheckpointImportError(ValueError):
  """A checkpoint that does not fit the model config (names the tensor and the param)."""


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


# -- config --------------------------------------------------------------------------------


def model_config_from_hf(config_json: dict) -> dict:
  """ModelConfig field values from an HF `config.json` (Gemma, Gemma2, Gemma3 text or MM).

  Reads both config generations: transformers < 5 (`rope_theta`, `rope_scaling`,
  `rope_local_base_freq`, `sliding_window_pattern`) and >= 5 (`rope_parameters` per
  attention type, `layer_types`). A setting the model cannot express is an error rather
  than a silently different network.
  """
  c = dict(config_json.get('text_config') or config_json)  # Gemma3ForConditionalGeneration
  model_type = str(c.get('model_type') or config_json.get('model_type', ''))
  if model_type not in ('gemma', 'gemma2', 'gemma3', 'gemma3_text'):
    raise CheckpointImportError(f'config.json model_type {model_type!r} is not Gemma 1/2/3')
  act = c.get('hidden_activation') or c.get('hidden_act') or 'gelu_pytorch_tanh'
  if act not in ('gelu_pytorch_tanh', 'gelu'):  # Gemma 1's config says "gelu", means tanh.
    raise CheckpointImportError(f'config.json activation {act!r}: the model has tanh-GELU only')
  for key, ok in [('rms_norm_eps', lambda v: v in (None, 1e-6)),
                  ('tie_word_embeddings', lambda v: v in (None, True)),
                  ('use_bidirectional_attention', lambda v: not v)]:
    if not ok(c.get(key)):
      raise CheckpointImportError(f'config.json {key}={c.get(key)!r} is not supported')
  num_heads = c['num_attention_heads']
  out = dict(vocab_size=c['vocab_size'], embed_dim=c['hidden_size'],
             hidden_dim=c['intermediate_size'], num_layers=c['num_hidden_layers'],
             num_heads=num_heads, num_kv_heads=c.get('num_key_value_heads', num_heads),
             head_dim=c.get('head_dim') or c['hidden_size'] // num_heads)
  global_rope, local_rope = _rope(c)
  out['rope_base'] = int(global_rope.get('rope_theta', 10_000))
  kind = global_rope.get('rope_type', 'default')
  if kind == 'linear':
    out['rope_scale_factor'] = float(global_rope['factor'])
  elif kind != 'default':
    raise CheckpointImportError(f'config.json rotary scaling {global_rope}: only linear')
  if model_type == 'gemma':
    return _known_fields(out)
  out.update(use_post_attn_norm=True, use_post_ffw_norm=True,
             query_pre_attn_scalar=c.get('query_pre_attn_scalar'),
             attn_logits_soft_cap=c.get('attn_logit_softcapping'),
             final_logit_soft_cap=c.get('final_logit_softcapping'),
             local_global_pattern=_local_global_pattern(c, model_type))
  if out['local_global_pattern']:
    out['sliding_window_size'] = c['sliding_window']
    out['local_rope_base'] = int(local_rope.get('rope_theta', 10_000))
    if local_rope.get('rope_type', 'default') != 'default':
      raise CheckpointImportError(f'config.json local rotary scaling {local_rope} unsupported')
  if model_type.startswith('gemma3'):
    out['use_qk_norm'] = True
  return _known_fields(out)


def _known_fields(values: dict) -> dict:
  """The values, after checking ModelConfig has each field (names drift; fail clearly)."""
  unknown = set(values) - {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  if unknown:
    raise CheckpointImportError(f'ModelConfig has no field(s) {sorted(unknown)} for this '
                                'checkpoint; import_hf.model_config_from_hf needs updating')
  return values


def _rope(c: dict) -> tuple[dict, dict]:
  """(global, local) rotary settings as {'rope_theta', 'rope_type', 'factor'}."""
  params = c.get('rope_parameters')
  if params:  # transformers >= 5
    if 'full_attention' in params:
      return dict(params['full_attention']), dict(params.get('sliding_attention', {}))
    return dict(params), dict(params)
  scaling = dict(c.get('rope_scaling') or {})
  kind = scaling.pop('rope_type', scaling.pop('type', 'default'))
  global_rope = dict(scaling, rope_type=kind, rope_theta=c.get('rope_theta', 10_000))
  local_rope = dict(rope_type='default',
                    rope_theta=c.get('rope_local_base_freq', c.get('rope_theta', 10_000)))
  return global_rope, local_rope


def _local_global_pattern(c: dict, model_type: str) -> int:
  """ModelConfig.local_global_pattern n: layer i is global iff (i + 1) % n == 0 (0: all)."""
  if not c.get('layer_types'):  # transformers 4.x: HF's rule is the same as ours.
    return 2 if model_type == 'gemma2' else int(c.get('sliding_window_pattern', 6))
  types = list(c['layer_types'])
  bad = sorted(set(types) - {'sliding_attention', 'full_attention'})
  if bad:
    raise CheckpointImportError(f'config.json layer_types has unsupported {bad}')
  for n in [0] + list(range(2, len(types) + 2)):
    rule = ['full_attention' if n == 0 or (i + 1) % n == 0 else 'sliding_attention'
            for i in range(len(types))]
    if rule == types:
      return n
  raise CheckpointImportError(f'config.json layer_types {types} is not "every n-th layer '
                              'global", which is all ModelConfig.local_global_pattern can say')


# -- the mapping ---------------------------------------------------------------------------


def _split_heads(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [heads*H, D] -> our [heads, D, H]."""
  out, d = w_OxI.shape
  return w_OxI.reshape(heads, out // heads, d).transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Our param from HF tensors: `build(*arrays)`; `shapes` are the HF shapes it expects."""
  sources: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[..., np.ndarray]


def recipe_for(path: str, shape: tuple[int, ...], our_paths: frozenset) -> Recipe:
  """Where our param `path` (of `shape`) comes from in an HF Gemma checkpoint."""
  ident = lambda x: x
  if path == 'embedder/input_embedding':
    return Recipe(('model.embed_tokens.weight',), (shape,), ident)
  if path == 'final_norm/scale':
    return Recipe(('model.norm.weight',), (shape,), ident)
  m = re.fullmatch(r'layer_(\d+)/(.+)', path)
  if not m:
    raise CheckpointImportError(f'no HF source known for our param {path} {shape}')
  i, rest = m.groups()
  hf = f'model.layers.{i}.'
  # Gemma 1 has no post-norms and calls its pre-FFW norm `post_attention_layernorm`.
  gemma1 = f'layer_{i}/post_attention_norm/scale' not in our_paths
  norms = {'pre_attention_norm/scale': 'input_layernorm',
           'post_attention_norm/scale': 'post_attention_layernorm',
           'pre_ffw_norm/scale': 'post_attention_layernorm' if gemma1 else 'pre_feedforward_layernorm',
           'post_ffw_norm/scale': 'post_feedforward_layernorm',
           'attn/_query_norm/scale': 'self_attn.q_norm', 'attn/_key_norm/scale': 'self_attn.k_norm'}
  if rest in norms:
    return Recipe((hf + norms[rest] + '.weight',), (shape,), ident)
  proj = lambda p: f'{hf}self_attn.{p}_proj.weight'
  if rest == 'attn/q_einsum/w':
    n, d, h = shape
    return Recipe((proj('q'),), ((n * h, d),), lambda q: _split_heads(q, n))
  if rest == 'attn/kv_einsum/w':
    _, k, d, h = shape
    return Recipe((proj('k'), proj('v')), ((k * h, d),) * 2,
                  lambda a, b: np.stack([_split_heads(a, k), _split_heads(b, k)]))
  if rest == 'attn/qkv_einsum/w':
    _, n, d, h = shape
    return Recipe((proj('q'), proj('k'), proj('v')), ((n * h, d),) * 3,
                  lambda *qkv: np.stack([_split_heads(x, n) for x in qkv]))
  if rest == 'attn/attn_vec_einsum/w':
    n, h, d = shape
    return Recipe((proj('o'),), ((d, n * h),), lambda o: o.reshape(d, n, h).transpose(1, 2, 0))
  if rest == 'mlp/gating_einsum':
    _, d, f = shape
    return Recipe((hf + 'mlp.gate_proj.weight', hf + 'mlp.up_proj.weight'), ((f, d),) * 2,
                  lambda g, u: np.stack([g.T, u.T]))
  if rest == 'mlp/linear':
    f, d = shape
    return Recipe((hf + 'mlp.down_proj.weight',), ((d, f),), lambda w: w.T)
  raise CheckpointImportError(f'no HF source known for our param {path} {shape}')


def abstract_params(model_config: model_lib.ModelConfig) -> Any:
  """The model's param tree as ShapeDtypeStructs (nothing allocated)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  valid = jnp.ones((1, 1), bool)
  variables = jax.eval_shape(
      model_lib.Transformer(model_config).init, jax.random.key(0), tokens,
      model_lib.positions_from_valid(valid), model_lib.causal_attention_mask(valid))
  return variables['params']


def plan(table: dict[str, TensorInfo], abstract: Any) -> dict[str, Recipe]:
  """Recipe per our path, after checking names and shapes against the HF table."""
  paths = jax.tree.leaves(sharding_lib.tree_paths(abstract))
  shapes = dict(zip(paths, (tuple(x.shape) for x in jax.tree.leaves(abstract))))
  our_paths = frozenset(paths)
  recipes = {p: recipe_for(p, shapes[p], our_paths) for p in paths}
  missing = [(s, p) for p, r in recipes.items() for s in r.sources if s not in table]
  if missing:
    shown = ', '.join(f'{s} (for our {p})' for s, p in missing[:8])
    raise CheckpointImportError(f'{len(missing)} tensor(s) missing from the checkpoint: {shown}'
                       + (' ...' if len(missing) > 8 else ''))
  used = {s for r in recipes.values() for s in r.sources}
  unexpected = sorted(set(table) - used - {'lm_head.weight'})
  if unexpected:
    raise CheckpointImportError(f'{len(unexpected)} unexpected tensor(s) in the checkpoint (not part '
                       f'of this model config): {unexpected[:8]}'
                       + (' ...' if len(unexpected) > 8 else ''))
  for p, r in recipes.items():
    for s, want in zip(r.sources, r.shapes):
      if table[s].shape != want:
        raise CheckpointImportError(f'shape mismatch: HF tensor {s} has shape {list(table[s].shape)}, '
                           f'our {p} {list(shapes[p])} needs it to be {list(want)}')
  return recipes


def _check_tied(table: dict[str, TensorInfo], chunk_bytes: int = 64 << 20):
  """An `lm_head.weight` must equal the embedding: the model ties them."""
  head, emb = table.get('lm_head.weight'), table['model.embed_tokens.weight']
  if head is None:
    return
  if head.shape != emb.shape:
    raise CheckpointImportError(f'lm_head.weight {list(head.shape)} differs in shape from '
                       f'model.embed_tokens.weight {list(emb.shape)}: untied heads unsupported')
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
        raise CheckpointImportError('lm_head.weight differs from model.embed_tokens.weight: the model '
                           'ties its unembedding, untied checkpoints are not supported')


def place(x: np.ndarray, sharding) -> jax.Array:
  """Host array -> device array on `sharding` (each process supplies only its own shards)."""
  if sharding is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


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
  recipes = plan(table, abstract)
  _check_tied(table)
  target = np.dtype(jnp.dtype(dtype or model_config.param_dtype))
  paths, treedef = jax.tree.flatten(sharding_lib.tree_paths(abstract))
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    sharding_list = [shardings] * len(paths)
  else:
    sharding_list = treedef.flatten_up_to(shardings)
  leaves = []
  for p, sharding in zip(paths, sharding_list):  # One param's host copies alive at a time.
    arrays = [read_tensor(table[s]) for s in recipes[p].sources]
    x = np.ascontiguousarray(recipes[p].build(*arrays), dtype=target)
    del arrays  # Free the raw tensors before the device copy.
    leaves.append(place(x, sharding))
    del x
  return jax.tree.unflatten(treedef, leaves)


def load_config(path: str) -> dict:
  """`model_config_from_hf` of the `config.json` in checkpoint directory `path`."""
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointImportError(f'no config.json in {path}')
  with open(file) as f:
    return model_config_from_hf(json.load(f))
