"""Official Gemma Flax/Orbax checkpoints (Kaggle, the `gemma` library) -> our param tree.

Our tree is Gemma's own (`model.py` keeps the reference names), so this is mostly about
the checkpoint's outer structure, which has changed between releases (cf. the `gemma`
library's `gm/ckpts/_checkpoint.py`):
- NESTED: `{'transformer': {'embedder': ..., 'layer_0': ..., 'final_norm': ...}}`, or the
  same without the `transformer` root (the `model.init()` structure; under `params` in a
  Kauldron train state);
- FLAT (the released Gemma 1/2/3 checkpoints): one entry per module,
  `'transformer/layer_0/attn/q_einsum': {'w': ...}`,
  `'transformer/embedder': {'input_embedding': ...}`, and the MLP's arrays one level
  deeper, `'transformer/layer_0/mlp/gating_einsum': {'w': ...}`.
Two array layouts differ too: Gemma 2 9B/27B and Gemma 3 store `gating_einsum` as
[2, F, D] (ours is [2, D, F]), and the released embeddings are padded past the tokenizer
(256_128 rows for Gemma 1/2), which `truncate_vocab=True` cuts to `vocab_size`.

Only the arrays the model needs are restored (Orbax partial restore), each straight onto
its target sharding and dtype; multimodal checkpoints' image tower is left on disk.
"""
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from score_jax.weights import hf as import_hf
from score_jax import model as model_lib
from score_jax import sharding as sharding_lib

CheckpointImportError = import_hf.CheckpointImportError

# Multimodal Gemma 3: the image tower and its projection into the text embedding.
_IMAGE_PARTS = ('vision_encoder', 'SigLiPFromPatches_0', 'mm_input_projection',
                'mm_soft_embedding_norm')


def checkpoint_arrays(path: str) -> dict[tuple[str, ...], Any]:
  """Key path -> ArrayMetadata (shape, dtype) of every array in the checkpoint."""
  if not os.path.isdir(path):
    raise CheckpointImportError(f'Orbax checkpoint directory not found: {path}')
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception as e:  # Orbax raises many types for a bad directory.
    raise CheckpointImportError(f'{path}: not a readable Orbax checkpoint: '
                                f'{type(e).__name__}: {e}') from e
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  flat = {}

  def walk(node, prefix):
    if hasattr(node, 'shape') and hasattr(node, 'dtype'):
      flat[prefix] = node
    elif hasattr(node, 'items'):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
  walk(tree, ())
  if not flat:
    raise CheckpointImportError(f'{path}: the Orbax checkpoint holds no arrays')
  return flat


def checkpoint_key(our_path: str, layout: str, root: tuple[str, ...]) -> tuple[str, ...]:
  """Where our param lives in a checkpoint of `layout` ('nested' / 'flat') under `root`."""
  parts = tuple(our_path.split('/'))
  if layout == 'nested':
    return root + parts
  if parts[-2:-1] == ('mlp',):  # The released MLP arrays sit one level deeper, as `w`.
    return ('transformer/' + our_path, 'w')
  return ('transformer/' + '/'.join(parts[:-1]), parts[-1])


def detect_layout(keys) -> tuple[str, tuple[str, ...]]:
  """('flat' | 'nested', root) of a checkpoint from its array key paths."""
  firsts = {k[0] for k in keys}
  if any(f.startswith('transformer/stacked_layers') for f in firsts):
    raise CheckpointImportError('stacked-layer Gemma checkpoints are not supported; '
                                'convert with the gemma library first')
  if any(f.startswith('transformer/') for f in firsts):
    return 'flat', ()
  for root in (('transformer',), ('params', 'transformer'), ('params',), ()):
    if all(k[:len(root)] == root for k in keys if not _is_image_part(k)):
      if any(k[len(root):len(root) + 1] == ('embedder',) for k in keys):
        return 'nested', root
  raise CheckpointImportError(f'unrecognised Gemma checkpoint structure; top-level keys '
                              f'{sorted(firsts)[:8]}')


def _is_image_part(key: tuple[str, ...]) -> bool:
  return any(p.split('/')[0] in _IMAGE_PARTS or p.split('/')[-1] in _IMAGE_PARTS
             for p in key)


def _transposed_spec(sharding, ndim: int, perm: tuple[int, ...]):
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in perm)))
  return sharding


def plan(arrays: dict, abstract, truncate_vocab: bool):
  """Per our path: (checkpoint key, checkpoint shape, fix) after checking every name/shape.

  fix is None, 'transpose' ([2,F,D] -> [2,D,F]) or 'truncate' (embedding rows).
  """
  layout, root = detect_layout(arrays)
  paths = jax.tree.leaves(sharding_lib.tree_paths(abstract))
  shapes = dict(zip(paths, (tuple(x.shape) for x in jax.tree.leaves(abstract))))
  out, missing = {}, []
  for p in paths:
    key = checkpoint_key(p, layout, root)
    if key not in arrays:
      missing.append(f'{"/".join(key)} (for our {p})')
      continue
    have, want = tuple(arrays[key].shape), shapes[p]
    fix = None
    if have != want:
      if p.endswith('mlp/gating_einsum') and have == (want[0], want[2], want[1]):
        fix = 'transpose'
      elif p == 'embedder/input_embedding' and have[1:] == want[1:] and have[0] > want[0]:
        if not truncate_vocab:
          raise CheckpointImportError(
              f'checkpoint embedding {"/".join(key)} has {have[0]} rows, the model config '
              f'vocab_size={want[0]}: pass truncate_vocab=True (rows past the tokenizer are '
              f'padding) or set vocab_size={have[0]}')
        fix = 'truncate'
      else:
        raise CheckpointImportError(f'shape mismatch: checkpoint array {"/".join(key)} has '
                                    f'shape {list(have)}, our {p} needs {list(want)}')
    out[p] = (key, have, fix)
  if missing:
    raise CheckpointImportError(f'{len(missing)} array(s) missing from the {layout} checkpoint: '
                                + ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
  used = {key for key, _, _ in out.values()}
  unexpected = sorted('/'.join(k) for k in arrays if k not in used and not _is_image_part(k))
  if unexpected:
    raise CheckpointImportError(f'{len(unexpected)} unexpected array(s) in the checkpoint (not '
                                f'part of this model config): {unexpected[:8]}'
                                + (' ...' if len(unexpected) > 8 else ''))
  return out


def load_checkpoint(path: str, model_config: model_lib.ModelConfig, shardings=None,
               dtype=None, abstract=None, truncate_vocab: bool = False) -> Any:
  """Params for `model_config` from an official Gemma Orbax checkpoint directory.

  `shardings`: None (first device), one Sharding, or a tree like the params. `dtype`
  overrides `model_config.param_dtype`. `abstract`: expected tree (default the model's).
  """
  if abstract is None:
    abstract = import_hf.abstract_params(model_config)
  target = jnp.dtype(dtype or model_config.param_dtype)
  paths, treedef = jax.tree.flatten(sharding_lib.tree_paths(abstract))
  if shardings is None:
    shardings = SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    sharding_list = [shardings] * len(paths)
  else:
    sharding_list = treedef.flatten_up_to(shardings)
  by_path = dict(zip(paths, sharding_list))
  arrays = checkpoint_arrays(path)
  recipes = plan(arrays, abstract, truncate_vocab)

  # The restore target: the checkpoint's own structure, only the arrays we use.
  item, restore_args = {}, {}
  for p, (key, shape, fix) in recipes.items():
    sharding = by_path[p]
    if fix == 'transpose':
      sharding = _transposed_spec(sharding, len(shape), (0, 2, 1))
    elif fix == 'truncate' and isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec())  # rows may not divide
    node, args = item, restore_args
    for k in key[:-1]:
      node, args = node.setdefault(k, {}), args.setdefault(k, {})
    node[key[-1]] = jax.ShapeDtypeStruct(shape, target, sharding=sharding)
    args[key[-1]] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=target, global_shape=shape)
  try:
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise CheckpointImportError(f'{path}: Orbax restore failed: {type(e).__name__}: {e}') from e

  rows = dict(zip(paths, (x.shape[0] for x in jax.tree.leaves(abstract))))
  leaves = []
  for p in paths:
    key, _, fix = recipes[p]
    x = restored
    for k in key:
      x = x[k]
    if fix == 'transpose':  # Module-level functions: jit caches them across params.
      x = jax.jit(_swap_last_two, out_shardings=by_path[p])(x)
    elif fix == 'truncate':
      x = jax.jit(_first_rows, static_argnums=1, out_shardings=by_path[p])(x, rows[p])
    leaves.append(x)
  return jax.tree.unflatten(treedef, leaves)


def _swap_last_two(x):  # [2, F, D] -> [2, D, F]
  return x.transpose(0, 2, 1)


def _first_rows(x, n: int):  # padded vocabulary rows dropped
  return x[:n]
