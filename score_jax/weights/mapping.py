"""Our param tree <-> Hugging Face tensor names, both ways, for every family.

Every source of weights is first named as Hugging Face names it (`model.layers.3.self_attn.
q_proj.weight`, torch layout [out, in]): safetensors already are, GGUF files are renamed
(`weights/gguf.py`). One `Recipe` per param of ours then says which HF tensors build it
and how (`build`), and how to take it apart again (`split`, for `score_jax.export`), so
the import and the export cannot drift apart. Gemma and the Llama layout (Llama, Qwen,
SmolLM2, Mistral) share the names: Llama's pre-MLP norm is `post_attention_layernorm`, as
Gemma 1's; Gemma 2/3 add the post-norms; Qwen2 adds q/k/v biases, Qwen3 q/k norms.

The expected tree is the model's own (`jax.eval_shape` of its init), so nothing here
restates which params a ModelConfig has; it says only where each of them comes from.
"""
import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import model as model_lib
from score_jax import sharding as sharding_lib

LM_HEAD = 'lm_head.weight'
EMBED = 'model.embed_tokens.weight'


class CheckpointImportError(ValueError):
  """A checkpoint that does not fit the model config (names the tensor and the param)."""


def _split_heads(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [heads*H, D] -> our [heads, D, H]."""
  out, d = w_OxI.shape
  return w_OxI.reshape(heads, out // heads, d).transpose(0, 2, 1)


def _join_heads(w_NxDxH: np.ndarray) -> np.ndarray:
  """Our [heads, D, H] -> torch Linear weight [heads*H, D] (inverse of `_split_heads`)."""
  n, d, h = w_NxDxH.shape
  return w_NxDxH.transpose(0, 2, 1).reshape(n * h, d)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Our param from HF tensors, `build(*arrays)`, and back, `split(ours) -> arrays`;
  `shapes` are the HF shapes, in the order of `sources`."""
  sources: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[..., np.ndarray]
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(source: str, shape) -> Recipe:
  return Recipe((source,), (tuple(shape),), lambda x: x, lambda x: (x,))


def recipe_for(path: str, shape: tuple[int, ...], our_paths: frozenset) -> Recipe:
  """Where our param `path` (of `shape`) comes from in an HF checkpoint of any family."""
  if path == 'embedder/input_embedding':
    return _same(EMBED, shape)
  if path == 'embedder/lm_head':
    return _same(LM_HEAD, shape)
  if path == 'final_norm/scale':
    return _same('model.norm.weight', shape)
  m = re.fullmatch(r'layer_(\d+)/(.+)', path)
  if not m:
    raise CheckpointImportError(f'no HF source known for our param {path} {shape}')
  i, rest = m.groups()
  hf = f'model.layers.{i}.'
  # Gemma 1 and the Llama layout have no post-norms and call the pre-MLP norm
  # `post_attention_layernorm`.
  no_post_norms = f'layer_{i}/post_attention_norm/scale' not in our_paths
  norms = {'pre_attention_norm/scale': 'input_layernorm',
           'post_attention_norm/scale': 'post_attention_layernorm',
           'pre_ffw_norm/scale': ('post_attention_layernorm' if no_post_norms
                                  else 'pre_feedforward_layernorm'),
           'post_ffw_norm/scale': 'post_feedforward_layernorm',
           'attn/_query_norm/scale': 'self_attn.q_norm', 'attn/_key_norm/scale': 'self_attn.k_norm'}
  if rest in norms:
    return _same(hf + norms[rest] + '.weight', shape)
  proj = lambda p, kind='weight': f'{hf}self_attn.{p}_proj.{kind}'
  if rest == 'attn/q_einsum/w':
    n, d, h = shape
    return Recipe((proj('q'),), ((n * h, d),), lambda q: _split_heads(q, n),
                  lambda w: (_join_heads(w),))
  if rest == 'attn/kv_einsum/w':
    _, k, d, h = shape
    return Recipe((proj('k'), proj('v')), ((k * h, d),) * 2,
                  lambda a, b: np.stack([_split_heads(a, k), _split_heads(b, k)]),
                  lambda w: tuple(_join_heads(x) for x in w))
  if rest == 'attn/qkv_einsum/w':
    _, n, d, h = shape
    return Recipe((proj('q'), proj('k'), proj('v')), ((n * h, d),) * 3,
                  lambda *qkv: np.stack([_split_heads(x, n) for x in qkv]),
                  lambda w: tuple(_join_heads(x) for x in w))
  if rest == 'attn/attn_vec_einsum/w':
    n, h, d = shape
    return Recipe((proj('o'),), ((d, n * h),), lambda o: o.reshape(d, n, h).transpose(1, 2, 0),
                  lambda w: (w.reshape(n * h, d).T,))
  # Biases (Qwen2): [heads*H] in HF, [heads, H] in ours, stacked like the weights.
  if rest == 'attn/q_bias':
    n, h = shape
    return Recipe((proj('q', 'bias'),), ((n * h,),), lambda b: b.reshape(n, h),
                  lambda b: (b.reshape(-1),))
  if rest in ('attn/kv_bias', 'attn/qkv_bias'):
    c, n, h = shape
    names = ('k', 'v') if rest == 'attn/kv_bias' else ('q', 'k', 'v')
    return Recipe(tuple(proj(p, 'bias') for p in names), ((n * h,),) * c,
                  lambda *bs: np.stack([b.reshape(n, h) for b in bs]),
                  lambda b: tuple(x.reshape(-1) for x in b))
  if rest == 'mlp/gating_einsum':
    _, d, f = shape
    return Recipe((hf + 'mlp.gate_proj.weight', hf + 'mlp.up_proj.weight'), ((f, d),) * 2,
                  lambda g, u: np.stack([g.T, u.T]), lambda w: (w[0].T, w[1].T))
  if rest == 'mlp/linear':
    f, d = shape
    return Recipe((hf + 'mlp.down_proj.weight',), ((d, f),), lambda w: w.T, lambda w: (w.T,))
  raise CheckpointImportError(f'no HF source known for our param {path} {shape}')


def abstract_params(model_config: model_lib.ModelConfig) -> Any:
  """The model's param tree as ShapeDtypeStructs (nothing allocated)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  valid = jnp.ones((1, 1), bool)
  variables = jax.eval_shape(
      model_lib.Transformer(model_config).init, jax.random.key(0), tokens,
      model_lib.positions_from_valid(valid), model_lib.causal_attention_mask(valid))
  return variables['params']


def recipes(abstract: Any) -> dict[str, Recipe]:
  """Recipe per our '/'-joined param path."""
  paths = jax.tree.leaves(sharding_lib.tree_paths(abstract))
  shapes = dict(zip(paths, (tuple(x.shape) for x in jax.tree.leaves(abstract))))
  our_paths = frozenset(paths)
  return {p: recipe_for(p, shapes[p], our_paths) for p in paths}


def plan(shapes: dict[str, tuple[int, ...]], abstract: Any,
         ignored: frozenset = frozenset()) -> dict[str, Recipe]:
  """Recipe per our path, after checking the checkpoint's HF names -> shapes against them.

  `ignored`: checkpoint tensors that may be present without being used (a tied
  checkpoint's `lm_head.weight`, checked equal to the embedding by the caller).
  """
  plans = recipes(abstract)
  missing = [(s, p) for p, r in plans.items() for s in r.sources if s not in shapes]
  if missing:
    shown = ', '.join(f'{s} (for our {p})' for s, p in missing[:8])
    raise CheckpointImportError(f'{len(missing)} tensor(s) missing from the checkpoint: {shown}'
                                + (' ...' if len(missing) > 8 else ''))
  used = {s for r in plans.values() for s in r.sources}
  unexpected = sorted(set(shapes) - used - set(ignored))
  if unexpected:
    raise CheckpointImportError(f'{len(unexpected)} unexpected tensor(s) in the checkpoint (not '
                                f'part of this model config): {unexpected[:8]}'
                                + (' ...' if len(unexpected) > 8 else ''))
  our_shapes = dict(zip(jax.tree.leaves(sharding_lib.tree_paths(abstract)),
                        (list(x.shape) for x in jax.tree.leaves(abstract))))
  for p, r in plans.items():
    for s, want in zip(r.sources, r.shapes):
      if tuple(shapes[s]) != want:
        raise CheckpointImportError(
            f'shape mismatch: HF tensor {s} has shape {list(shapes[s])}, our {p} '
            f'{our_shapes[p]} needs it to be {list(want)}')
  return plans


def place(x: np.ndarray, sharding) -> jax.Array:
  """Host array -> device array on `sharding` (each process supplies only its own shards)."""
  if sharding is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def build_params(plans: dict[str, Recipe], read: Callable[[str], np.ndarray], abstract: Any,
                 shardings=None, dtype=None) -> Any:
  """Our params, one at a time: read its HF tensors, build, cast to `dtype`, place, drop.

  `shardings`: None (default device), one Sharding for all, or a tree like the params.
  Host memory peaks at the placed params plus about two copies of the largest one.
  """
  target = np.dtype(jnp.dtype(dtype))
  paths, treedef = jax.tree.flatten(sharding_lib.tree_paths(abstract))
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    sharding_list = [shardings] * len(paths)
  else:
    sharding_list = treedef.flatten_up_to(shardings)
  leaves = []
  for p, sharding in zip(paths, sharding_list):
    arrays = [read(s) for s in plans[p].sources]
    x = np.ascontiguousarray(plans[p].build(*arrays), dtype=target)
    del arrays  # Free the raw tensors before the device copy.
    leaves.append(place(x, sharding))
    del x
  return jax.tree.unflatten(treedef, leaves)


def hf_tensors(params: Any) -> dict[str, np.ndarray]:
  """Our params (host or device arrays) -> HF-named numpy tensors: every recipe's `split`.

  A tied model writes no `lm_head.weight` (transformers ties it on load)."""
  host = jax.tree.map(np.asarray, params)
  flat = dict(zip(jax.tree.leaves(sharding_lib.tree_paths(host)), jax.tree.leaves(host)))
  out = {}
  for p, r in recipes(host).items():
    for name, x in zip(r.sources, r.split(flat[p])):
      out[name] = np.ascontiguousarray(x)
  return out
