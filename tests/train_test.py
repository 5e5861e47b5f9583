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


def _loop_fixture(tmp_path):
  """A tiny SFT setup, its batch, and a step that reports the KL scale it was given and
  fake `kl1` / `r1` metrics from its step (best at step index 2)."""
  from score_jax import config_defaults

  config = config_defaults.get_config()
  config.model.update(vocab_size=32, embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2,
                      head_dim=16)
  config.checkpoint.every = 2
  setup = train.Setup(config, str(tmp_path))
  tx = optax.adam(1e-2)
  _, _, _, batch = _setup()
  batch = {k: batch[k] for k in ('tokens', 'valid', 'turn')}

  def step_fn(state, ref_params, b):
    new, m = train.sft_step(setup.model, tx, 8, (), state, ref_params,
                            {k: b[k] for k in batch})
    s = state.step.astype(jnp.float32)
    return new, dict(m, kl1=s + 0.5, r1=-(s - 2) ** 2, scale_seen=b['kl_scale'][0])
  return setup, tx, batch, step_fn


def _rows(tmp_path):
  from score_jax import writers
  return writers.read_rows(str(tmp_path))


@pytest.mark.parametrize('wait', [False, True])  # an accelerator's path; the CPU backend's
def test_loop_reads_metrics_one_step_late_and_keeps_every_step(tmp_path, monkeypatch, wait):
  """Batch n + 1 is made before step n's metrics are read (so before they are logged),
  yet the KL controller and the best-reward selection see step n before step n + 1, the
  sampler gets the params of step n, and a crash mid-phase resumes with each step logged
  once and the same params as a run without the crash."""
  import types
  assert train.host_waits_for_updates()  # the tests run on the CPU backend
  monkeypatch.setattr(train, 'host_waits_for_updates', lambda: wait)
  setup, tx, batch, step_fn = _loop_fixture(tmp_path)
  steps = 5
  phase = types.SimpleNamespace(name='p', steps=steps, turns=1)

  # The reference: the same updates one after another, waiting for each.
  state = train.TrainState(jnp.int32(0), setup.init_params(0), None)
  state = state.replace(opt_state=tx.init(state.params))
  jitted = jax.jit(functools.partial(train.sft_step, setup.model, tx, 8, ()))
  params_after = [state.params]
  for _ in range(steps):
    state, _ = jitted(state, None, batch)
    params_after.append(state.params)

  seen = []
  def batch_fn(params, step):
    if step == 3 and not seen_crash:
      seen_crash.append(step)
      raise RuntimeError('killed')
    seen.append((step, [r['step'] for r in _rows(tmp_path)]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_after[step])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    return dict(batch), {}

  def run():
    kl = train.AdaptiveKL(target=1.0, rate=0.1, anchored=(0,))
    best = train.BestReward(window=1)
    return train.train_phase(setup, phase, tx, step_fn, batch_fn,
                             lambda: setup.init_params(0), kl=kl, best=best)
  seen_crash = []
  with pytest.raises(RuntimeError, match='killed'):
    run()
  # Steps 0..2 ran; step 2's metrics were not read before the crash in batch 3, and the
  # last checkpoint is step 2's (every=2), so the resumed run starts at step index 2.
  assert [r['step'] for r in _rows(tmp_path)] == [1, 2]
  assert seen == [(0, []), (1, []), (2, [1])]
  seen.clear()
  best_params = run()
  assert seen == [(2, [1, 2]), (3, [1, 2]), (4, [1, 2, 3])]
  rows = _rows(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]  # each once
  # The scale of step k was updated from kl1 of steps 0..k-1 (kl1 = k + 0.5, target 1).
  scale = 1.0
  for k, row in enumerate(rows):
    assert row['scale_seen'] == pytest.approx(scale, rel=1e-6)
    scale *= 1 + 0.1 * float(np.clip((k + 0.5) - 1.0, -0.2, 0.2))
  assert all(r['train_time'] > 0 and r['step_time'] > 0 for r in rows)
  # The best window is step index 2's reward (0): the phase hands on its params.
  for a, b in zip(jax.tree.leaves(best_params), jax.tree.leaves(params_after[3])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
