"""The trainer's compiled SFT step on a (4, 2) data x model mesh of 8 CPU devices.

The device count is fixed when jax starts, and this pytest process may already have
started it with one device, so the checks run in a child process (this file run as a
script) with XLA_FLAGS forcing 8 host devices (mesh_helpers.run_child).
"""
import functools

import pytest

import mesh_helpers

RULES = [('.*mlp/gating_einsum', (None, None, 'model')), ('.*mlp/linear', ('model', None)),
         ('.*', ())]


def test_sft_step_on_8_devices():
  mesh_helpers.run_child(__file__, timeout=300)


def test_rules_naming_an_axis_the_mesh_lacks_are_refused():
  import jax
  import numpy as np
  from score_jax import sharding
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  with pytest.raises(ValueError, match=r"mesh axes \['model'\] that config\.mesh\.axes"):
    sharding.param_shardings(mesh, {'mlp': {'linear': np.zeros((4, 2))}}, sharding.FSDP_TP_RULES)


# -- the child: everything below runs with 8 devices ---------------------------------------


def _tiny_setup():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from score_jax import model as model_lib
  from score_jax import optimizer

  model = model_lib.Transformer(model_lib.ModelConfig(
      vocab_size=32, embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2, num_kv_heads=1,
      head_dim=16))
  valid = jnp.ones((1, 4), bool)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                            model_lib.positions_from_valid(valid),
                            model_lib.causal_attention_mask(valid))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape, np.float32), abstract)
  B, L = 8, 16
  valid = np.arange(L)[None, :] >= rng.integers(0, 6, size=(B, 1))  # left-padded
  turn = np.where(valid & (np.arange(L) >= 8), 1, 0).astype(np.int32)
  tokens = np.where(valid, rng.integers(4, 32, size=(B, L)), 0).astype(np.int32)
  batch = dict(tokens=tokens, valid=valid, turn=turn)
  tx = optimizer.make_optimizer(1e-2, 1.0)
  return model, abstract, params, batch, tx


def _run_sft(mesh, model, abstract, params, batch, tx, steps=2):
  """The trainer's state layout and jitted step on `mesh` -> (losses, final state, shardings)."""
  import jax
  import jax.numpy as jnp
  from score_jax import sharding
  from score_jax import train

  param_sh = sharding.param_shardings(mesh, abstract, RULES)
  opt_sh = sharding.follow_params(mesh, jax.eval_shape(tx.init, abstract), abstract, param_sh)
  repl = sharding.replicated(mesh)
  state_sh = train.TrainState(step=repl, params=param_sh, opt_state=opt_sh)
  step = jax.jit(functools.partial(train.sft_step, model, tx, 8, ()),
                 in_shardings=(state_sh, None, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, repl), donate_argnums=0)
  p = jax.device_put(params, param_sh)
  state = train.TrainState(jax.device_put(jnp.int32(0), repl), p,
                           jax.jit(tx.init, out_shardings=opt_sh)(p))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, None, batch)
    losses.append(float(metrics['loss']))
  return losses, state, state_sh


def _child():
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  from score_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh((4, 2), ('data', 'model'))
  assert dict(mesh.shape) == {'data': 4, 'model': 2}
  model, abstract, params, batch, tx = _tiny_setup()

  param_sh = sharding.param_shardings(mesh, abstract, RULES)
  specs = {p: s.spec for p, s in zip(jax.tree.leaves(sharding.tree_paths(abstract)),
                                      jax.tree.leaves(param_sh))}
  assert specs['layer_0/mlp/gating_einsum'] == P(None, None, 'model'), specs
  assert specs['layer_0/mlp/linear'] == P('model', None), specs
  others = {p: s for p, s in specs.items() if '/mlp/' not in p}
  assert others and all(s == P() for s in others.values()), others

  # Adam moments mirror their params; the step counter is replicated over all 8 devices.
  opt_sh = sharding.follow_params(mesh, jax.eval_shape(tx.init, abstract), abstract, param_sh)
  opt_paths = jax.tree.leaves(sharding.tree_paths(opt_sh))
  moments = 0
  for path, s in zip(opt_paths, jax.tree.leaves(opt_sh)):
    parts = path.split('/')
    if 'mu' in parts or 'nu' in parts:
      param_path = '/'.join(parts[parts.index('mu' if 'mu' in parts else 'nu') + 1:])
      assert s.spec == specs[param_path] and s.mesh == mesh, (path, s)
      moments += 1
    else:
      assert s.spec == P() and len(s.device_set) == 8, (path, s)
  assert moments == 2 * len(specs), opt_paths
  assert any(p.endswith('count') for p in opt_paths), opt_paths

  losses, state, state_sh = _run_sft(mesh, model, abstract, params, batch, tx)
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  losses_1, state_1, _ = _run_sft(one, model, abstract, params, batch, tx)
  np.testing.assert_allclose(losses, losses_1, atol=1e-5)
  assert losses[1] < losses[0], losses  # the update did something
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

  with pytest.raises(ValueError, match=r'config\.mesh\.shape'):
    sharding.make_mesh((3, 2), ('data', 'model'))  # 6 of 8 devices
  with pytest.raises(ValueError, match=r'config\.mesh\.shape'):
    sharding.make_mesh((-1, 3), ('data', 'model'))  # 3 does not divide 8
  with pytest.raises(ValueError, match=r'config\.mesh\.axes'):
    sharding.make_mesh((4, 2), ('batch', 'model'))
  print(f'losses {losses} (8 devices) vs {losses_1} (1 device)')
  print(mesh_helpers.PASSED)


if __name__ == '__main__':
  _child()
