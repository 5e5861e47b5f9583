"""The RL step's microbatching and the frozen reference's dtype."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import model as model_lib
from score_jax import objective
from score_jax import optimizer
from score_jax import train


def _setup(B=8, L=24):
  model = model_lib.Transformer(model_lib.ModelConfig(
      vocab_size=32, embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2, num_kv_heads=1,
      head_dim=16))
  valid = jnp.ones((1, 4), bool)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                      model_lib.positions_from_valid(valid),
                      model_lib.causal_attention_mask(valid))['params']
  rng = np.random.default_rng(0)
  valid = np.arange(L)[None, :] >= rng.integers(0, 6, size=(B, 1))  # left-padded prompts
  turn = np.select([np.arange(L) >= 16, np.arange(L) >= 8], [2, 1], 0)
  turn = np.where(valid, turn, 0).astype(np.int32)
  tokens = np.where(valid, rng.integers(4, 32, size=(B, L)), 0).astype(np.int32)
  batch = dict(tokens=tokens, valid=valid, turn=turn,
               rewards=rng.integers(0, 2, (B, 2)).astype(np.float32))
  # The reference differs from the policy, so the KL term has a gradient too.
  ref = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), params)
  return model, params, ref, batch


@pytest.mark.parametrize('stage,baseline,extras', [
    (1, 'rloo', ()), (2, 'rloo', ()), (2, 'batch_mean', ()), (1, 'rloo', ('kl_scale',)),
    (2, 'rloo', ('onpolicy',))])
def test_microbatched_step_equals_whole_batch_step(stage, baseline, extras):
  model, params, ref, batch = _setup()
  obj = objective.Objective(
      turns=2, train_turns=(2,) if stage == 1 else (1, 2), reward_weights=(1., 1.),
      alpha=0. if stage == 1 else 10., kl_coefs=(0.1, 0.01) if stage == 1 else (0.01, 0.01),
      baselines=(baseline,) * 2, kl_estimator='k1', kl_form='sequence', rloo_k=2)
  if 'kl_scale' in extras:
    batch = dict(batch, kl_scale=np.array([2.0, 1.0], np.float32))
  if 'onpolicy' in extras:
    batch = dict(batch, onpolicy=np.array([[i % 3 > 0, True] for i in range(8)]))
  tx = optax.sgd(1.0)  # The update is the gradient itself: compares gradients directly.
  out = {}
  for micro in (1, 2, 4):
    state = train.TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(functools.partial(train.rl_step, model, tx, 8, obj, microbatches=micro))
    new, m = step(state, ref, batch)
    out[micro] = (new.params, m)
  for micro in (2, 4):
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[micro][0])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for key in ('loss', 'pg_loss', 'kl_loss', 'kl1', 'kl2', 'adv2_std'):
      np.testing.assert_allclose(out[1][1][key], out[micro][1][key], rtol=1e-5, atol=1e-6)
  # Not vacuous: the step moved the parameters.
  moved = max(float(jnp.abs(a - b).max())
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out[1][0])))
  assert moved > 1e-4


def test_microbatches_are_strided_slices():
  x = jnp.arange(12).reshape(6, 2)
  mb = train._microbatches(x, 3)
  assert mb.shape == (3, 2, 2)
  np.testing.assert_array_equal(mb[1], x[1::3])


def test_reference_is_a_bfloat16_copy_on_the_param_shardings(tmp_path):
  from score_jax import config_defaults

  config = config_defaults.get_config()
  config.model.update(embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2, head_dim=16)
  config.rl.reference_dtype = 'bfloat16'
  setup = train.Setup(config, str(tmp_path))
  params = setup.init_params(0)
  ref = setup.as_reference(params)
  for p, r, s in zip(jax.tree.leaves(params), jax.tree.leaves(ref),
                     jax.tree.leaves(setup.param_sh)):
    assert p.dtype == jnp.float32 and r.dtype == jnp.bfloat16
    assert r.sharding == s
    np.testing.assert_array_equal(np.asarray(r), np.asarray(p.astype(jnp.bfloat16)))
  config.rl.reference_dtype = 'float32'
  assert setup.as_reference(params) is params  # same dtype: no copy


def test_adaptive_kl_moves_towards_its_target():
  kl = train.AdaptiveKL(target=1.0, rate=0.1, anchored=(0,))
  kl.update({'kl1': 3.0})  # far above: the largest step up, 1 + 0.1 * 0.2
  assert kl.scale == pytest.approx(1.02)
  kl.update({'kl1': 0.9})
  assert kl.scale == pytest.approx(1.02 * (1 - 0.01))
  np.testing.assert_allclose(kl.scale_T(3), [kl.scale, 1, 1])


def test_best_reward_needs_a_full_window():
  best = train.BestReward(window=3)
  assert [best.improved(r) for r in (1.0, 1.0, 0.1, 0.2, 1.0, 1.0)] == [
      False, False, True, False, False, True]
  assert best.best == pytest.approx(2.2 / 3) and best.history == [0.2, 1.0, 1.0]


def test_bfloat16_params_keep_a_float32_master_copy():
  """Updates far below bfloat16's spacing accumulate in the master and reach the params;
  applied to bfloat16 params directly they round away."""
  params = {'w': jnp.ones((4,), jnp.bfloat16)}
  grads = {'w': jnp.ones((4,), jnp.bfloat16)}
  out = {}
  for master in (True, False):
    tx = optimizer.make_optimizer(1e-4, 10.0, float32_master=master)  # ~1e-4 per step
    p, state = params, tx.init(params)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(grads, s, p)))
    for _ in range(200):
      p, state = step(p, state)
    out[master] = (p, state)
  p, state = out[True]
  assert p['w'].dtype == jnp.bfloat16 and state.master['w'].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(state.master['w']), 1 - 200 * 1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(p['w']),
                                np.asarray(state.master['w'].astype(jnp.bfloat16)))
  assert float(out[False][0]['w'][0]) == 1.0  # without the master: stuck at 1.0
