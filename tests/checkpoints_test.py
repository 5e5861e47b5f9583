"""Checkpoints: a clean round trip restores equal arrays; every corruption is refused by name."""
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts

from score_jax import checkpoints
from score_jax import model as model_lib
from score_jax import optimizer
from score_jax import sharding

CONFIG = model_lib.ModelConfig(vocab_size=64, embed_dim=32, hidden_dim=64, num_layers=2,
                               num_heads=2, num_kv_heads=1, head_dim=16)


def _state():
  """A tiny model's params and the trainer's Adam state after one update (so the moments
  are not zeros, which would compress to almost nothing)."""
  valid = jnp.ones((1, 4), bool)
  params = model_lib.Transformer(CONFIG).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32), model_lib.positions_from_valid(valid),
      model_lib.causal_attention_mask(valid))['params']
  tx = optimizer.make_optimizer(1e-2, 1.0)
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape),
                       params)
  updates, opt_state = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates), opt_state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path):
  params, opt_state = _state()
  directory = str(tmp_path / 'stage2')
  ckpt = checkpoints.Checkpointer(directory)
  assert ckpt.save(100, params, opt_state, dict(phase='stage2'), force=True)
  ckpt.close()
  return directory, params, opt_state


def _restore(directory, params, opt_state):
  ckpt = checkpoints.Checkpointer(directory)
  try:
    return ckpt.restore(None, _abstract(params), _abstract(opt_state))
  finally:
    ckpt.close()


def _data_files(directory, item):
  files = glob.glob(os.path.join(directory, '100', item, 'ocdbt.process_*', 'd', '*'))
  assert files, os.listdir(os.path.join(directory, '100', item))
  return sorted(files, key=os.path.getsize)


def _expect_refused(directory, params, opt_state, problem):
  """The error names the checkpoint, at least one array by its tree path, and the problem."""
  with pytest.raises(checkpoints.CheckpointError) as info:
    _restore(directory, params, opt_state)
  message = str(info.value)
  assert f'{directory}/100' in message, message
  paths = [f'{item}/{p}' for item, tree in (('params', params), ('opt_state', opt_state))
           for p in jax.tree.leaves(sharding.tree_paths(tree))]
  assert any(p in message for p in paths), message
  assert re.search(problem, message), message
  # Every listed array says what is wrong with it (not an error of the diagnosis itself).
  listed = [line for line in message.splitlines()[1:] if not line.startswith('  ...')]
  assert listed and all(re.match(r'  (params|opt_state)/\S+: ', line) for line in listed), message
  assert not any('TypeError' in line or 'ValueError' in line for line in listed), message
  return message


def test_clean_round_trip_restores_equal_arrays(saved):
  directory, params, opt_state = saved
  got_params, got_opt, meta = _restore(directory, params, opt_state)
  assert meta == dict(phase='stage2', step=100)
  for want, got in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((got_params, got_opt))):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Another dtype than saved: verified on the saved bits, then cast.
  ckpt = checkpoints.Checkpointer(directory)
  as_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                         params)
  bf16, _, _ = ckpt.restore(100, as_bf16)
  ckpt.close()
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(bf16)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def test_flipped_bytes_are_refused(saved):
  directory, params, opt_state = saved
  target = _data_files(directory, 'params')[-1]  # the largest: array data, not an index
  data = bytearray(open(target, 'rb').read())
  for i in range(len(data) // 3, len(data) // 3 + 4):
    data[i] ^= 0x5A
  open(target, 'wb').write(bytes(data))
  _expect_refused(directory, params, opt_state, r'digest .* differs|unreadable')


def test_flipped_bytes_in_optimizer_state_are_refused(saved):
  directory, params, opt_state = saved
  target = _data_files(directory, 'opt_state')[-1]
  data = bytearray(open(target, 'rb').read())
  data[len(data) // 2] ^= 0x01  # a single bit
  open(target, 'wb').write(bytes(data))
  message = _expect_refused(directory, params, opt_state, r'digest .* differs|unreadable')
  assert 'opt_state/' in message, message


def test_truncated_file_is_refused(saved):
  directory, params, opt_state = saved
  target = _data_files(directory, 'params')[-1]
  data = open(target, 'rb').read()
  open(target, 'wb').write(data[:len(data) // 2])
  _expect_refused(directory, params, opt_state, r'unreadable|digest .* differs')


def test_missing_file_is_refused(saved):
  directory, params, opt_state = saved
  os.remove(_data_files(directory, 'params')[-1])
  _expect_refused(directory, params, opt_state, r'unreadable|digest .* differs')


def test_nan_written_into_params_is_refused(saved):
  """A well-formed write of one NaN (through tensorstore, as a bad tool would)."""
  directory, params, opt_state = saved
  array = ts.open({'driver': 'zarr', 'kvstore': {
      'driver': 'ocdbt', 'base': f'file://{directory}/100/params/'},
      'path': 'layer_1.mlp.linear'}).result()
  array[3, 5] = float('nan')
  message = _expect_refused(directory, params, opt_state, r'1 non-finite values')
  assert 'params/layer_1/mlp/linear' in message, message


def test_missing_digests_record_is_refused(saved):
  directory, params, opt_state = saved
  for f in glob.glob(os.path.join(directory, '100', 'digests', '*')):
    os.remove(f)
  with pytest.raises(checkpoints.CheckpointError, match=r'no readable digests record'):
    _restore(directory, params, opt_state)


def test_other_model_config_is_named(saved):
  directory, params, opt_state = saved
  wider = dict(params, embedder=dict(input_embedding=jnp.zeros((65, 32))))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'embedder/input_embedding: saved \[64, 32\], wanted \[65, 32\]'):
    _restore(directory, wider, opt_state)


def test_non_finite_params_are_not_saved(saved):
  directory, params, opt_state = saved
  bad = jax.tree.map(lambda x: x, params)
  bad['final_norm']['scale'] = bad['final_norm']['scale'].at[0].set(jnp.inf)
  ckpt = checkpoints.Checkpointer(directory)
  with pytest.raises(checkpoints.CheckpointError, match=r'refusing to save step 200.*\n'
                     r'  final_norm/scale: 1 non-finite'):
    ckpt.save(200, bad, opt_state, force=True)
  assert ckpt.all_steps() == [100]  # the good checkpoint is kept
  ckpt.close()


def test_digest_sees_small_changes():
  x = jax.random.normal(jax.random.key(1), (64, 48))
  base, _ = checkpoints.array_digests({'x': x})
  changed = [
      x.at[7, 3].set(jnp.nextafter(x[7, 3], jnp.inf)),  # one ulp
      x.at[10:20].set(0.0),  # a zeroed block
      x[jnp.array([1, 0] + list(range(2, 64)))],  # two rows swapped: same values, other places
  ]  # (A reshape keeps the digest, which is of the bits in row-major order: the record's
  # shape catches that, test_other_model_config_is_named.)
  digests = {base['x']} | {checkpoints.array_digests({'x': c})[0]['x'] for c in changed}
  assert len(digests) == 1 + len(changed)
  # Words of every width: bf16 and bool widen, int32 as is.
  for y in (x.astype(jnp.bfloat16), x > 0, jnp.arange(10, dtype=jnp.int32), jnp.float32(3.0)):
    d, n = checkpoints.array_digests([y])
    assert re.fullmatch(r'[0-9a-f]{8}\.[0-9a-f]{8}', d['0']) and n['0'] == 0
  _, nonfinite = checkpoints.array_digests({'x': x.at[0, 0].set(jnp.nan).at[1, 1].set(-jnp.inf)})
  assert nonfinite == {'x': 2}


def test_urls_are_kept_and_local_paths_made_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert checkpoints.resolve_path('gs://bucket/runs/math/stage1') == 'gs://bucket/runs/math/stage1'
  assert checkpoints.resolve_path('runs/x') == str(tmp_path / 'runs' / 'x')
  assert checkpoints.latest_step('runs/none') is None  # a missing local directory
