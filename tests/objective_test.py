"""Tests of the SCoRe objective against a plain NumPy re-derivation."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_jax import objective


def make_cfg(**kw):
  cfg = dict(stage=1, alpha=10., beta1=0.01, beta2=0.1, kl_estimator='k1',
             baseline='rloo', rloo_k=2, normalize_advantages=False)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------- NumPy reference

def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_advantages(r1, r2, stage, alpha, baseline, k, normalize):
  rets = [None, r2] if stage == 1 else [r1, r2 + alpha * (r2 - r1)]
  out = []
  for ret in rets:
    if ret is None:
      out.append(np.zeros_like(r1))
      continue
    b = np.zeros_like(ret)
    for i in range(len(ret)):
      if baseline == 'batch_mean':
        b[i] = ret.mean()
      elif baseline == 'rloo':
        group = range(i // k * k, i // k * k + k)
        b[i] = np.mean([ret[j] for j in group if j != i])
    adv = ret - b
    if normalize:
      adv = adv / (adv.std() + 1e-6)
    out.append(adv)
  return out


def np_loss_and_grad(logits, tokens, logp_ref, turn, r1, r2, cfg):
  """Loss and d loss / d logits, derived by hand."""
  B = logits.shape[0]
  logsm = np_log_softmax(logits)
  lp = np.take_along_axis(logsm, tokens[..., None], -1)[..., 0]
  m1, m2 = (turn == 1).astype(float), (turn == 2).astype(float)
  lp, lr = lp * (m1 + m2), logp_ref * (m1 + m2)
  a1, a2 = np_advantages(r1, r2, cfg.stage, cfg.alpha, cfg.baseline, cfg.rloo_k,
                         cfg.normalize_advantages)
  d = lp - lr
  if cfg.kl_estimator == 'k1':
    surr, dsurr = 0.5 * d**2, d
  else:
    surr, dsurr = np.exp(-d) + d - 1, 1 - np.exp(-d)
  c1, c2 = (cfg.beta2, cfg.beta1) if cfg.stage == 1 else (cfg.beta1, cfg.beta1)
  per_ep = (-a1 * (m1 * lp).sum(1) - a2 * (m2 * lp).sum(1)
            + c1 * (m1 * surr).sum(1) + c2 * (m2 * surr).sum(1))
  dlp = (m1 * (-a1[:, None] + c1 * dsurr) + m2 * (-a2[:, None] + c2 * dsurr)) / B
  onehot = np.eye(logits.shape[-1])[tokens]
  return per_ep.mean(), dlp[..., None] * (onehot - np.exp(logsm))


def jax_loss(logits_BxSxV, tokens_BxS, logp_ref_BxS, turn_BxS, r1_B, r2_B, cfg):
  logp_BxS = jnp.take_along_axis(jax.nn.log_softmax(logits_BxSxV),
                                 tokens_BxS[..., None], -1)[..., 0]
  return objective.score_loss(logp_BxS, logp_ref_BxS, turn_BxS, r1_B, r2_B, cfg)


def tiny_batch(B=6, S=9, V=5, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, S, V))
  tokens = rng.integers(0, V, size=(B, S))
  logp_ref = np.take_along_axis(np_log_softmax(rng.normal(size=(B, S, V))),
                                tokens[..., None], -1)[..., 0]
  # [prompt | y1 | instr | y2] with ragged pads inside each buffer.
  turn = np.array([0, 0, 1, 1, 1, 0, 2, 2, 2] * B).reshape(B, S)
  for b in range(B):
    turn[b, 2 + 3 - b % 3:5] = 0
    turn[b, 9 - b % 2:] = 0
  r1 = rng.integers(0, 2, size=B).astype(float)
  r2 = rng.integers(0, 2, size=B).astype(float)
  return logits, tokens, logp_ref, turn, r1, r2


# ---------------------------------------------------------------- loss and gradient

CASES = [dict(stage=s, kl_estimator=e, baseline=b, rloo_k=k, normalize_advantages=n)
         for s, e, (b, k), n in itertools.product(
             (1, 2), ('k1', 'k3'),
             (('rloo', 2), ('rloo', 3), ('batch_mean', 2), ('none', 2)), (False,))]
CASES += [dict(stage=2, kl_estimator='k3', baseline='rloo', rloo_k=3,
               normalize_advantages=True)]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_loss_and_grad_match_numpy(case):
  cfg = make_cfg(**case)
  logits, tokens, logp_ref, turn, r1, r2 = tiny_batch()
  want_loss, want_grad = np_loss_and_grad(logits, tokens, logp_ref, turn, r1, r2, cfg)
  (loss, metrics), grad = jax.value_and_grad(jax_loss, has_aux=True)(
      jnp.asarray(logits, jnp.float32), tokens, logp_ref, turn, r1, r2, cfg)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics['pg_loss'] + metrics['kl_loss'], loss, rtol=1e-5)


def test_advantages_by_hand():
  r1, r2 = jnp.array([0., 1., 1., 0.]), jnp.array([1., 1., 0., 0.])
  want = {  # (stage, baseline): (A1, A2); stage II returns are r2 + 10 (r2 - r1)
      (1, 'rloo'): ([0, 0, 0, 0], [0, 0, 0, 0]),
      (1, 'batch_mean'): ([0, 0, 0, 0], [.5, .5, -.5, -.5]),
      (1, 'none'): ([0, 0, 0, 0], [1, 1, 0, 0]),
      # turn-2 returns [11, 1, -10, 0]; groups {11, 1} and {-10, 0}
      (2, 'rloo'): ([-1, 1, 1, -1], [10, -10, -10, 10]),
      (2, 'batch_mean'): ([-.5, .5, .5, -.5], [10.5, .5, -10.5, -.5]),
      (2, 'none'): ([0, 1, 1, 0], [11, 1, -10, 0]),
  }
  for (stage, baseline), (a1, a2) in want.items():
    got = objective.advantages(r1, r2, stage, 10., baseline, k=2)
    np.testing.assert_allclose(got[0], a1, err_msg=f'{stage} {baseline}')
    np.testing.assert_allclose(got[1], a2, err_msg=f'{stage} {baseline}')
  # k = 4: everyone is compared with the other three.
  _, a2 = objective.advantages(r1, r2, 1, 10., 'rloo', k=4)
  np.testing.assert_allclose(a2, [2 / 3, 2 / 3, -2 / 3, -2 / 3], rtol=1e-6)


def test_stage2_bonus_ranks_flips():
  # wrong->right, right->right, right->wrong, wrong->wrong
  r1, r2 = jnp.array([0., 1., 1., 0.]), jnp.array([1., 1., 0., 0.])
  _, a2 = objective.advantages(r1, r2, 2, 10., 'none')
  np.testing.assert_allclose(a2, [11., 1., -10., 0.])
  _, a2 = objective.advantages(r1, r2, 2, 10., 'batch_mean')
  assert a2[0] > a2[1] > a2[3] > a2[2] and a2[2] < 0 < a2[0]


# ---------------------------------------------------------------- the turn-1 constraint

def test_kl_surrogates_have_the_right_expected_gradient():
  """Enumerating all tokens: E_pi[grad surrogate] is grad of a true KL; E_pi[grad d] = 0."""
  rng = np.random.default_rng(1)
  logits0, ref_logits = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)
  logp_ref = jax.nn.log_softmax(ref_logits)
  pi0 = jax.nn.softmax(logits0)

  def expected(logits, estimator, use_value):
    value, surrogate = objective.kl_terms(jax.nn.log_softmax(logits), logp_ref, estimator)
    return jnp.sum(pi0 * (value if use_value else surrogate))

  def kl(logp_p, logp_q):
    return jnp.sum(jnp.exp(logp_p) * (logp_p - logp_q))

  g_k1 = jax.grad(expected)(logits0, 'k1', False)
  g_k3 = jax.grad(expected)(logits0, 'k3', False)
  g_naive = jax.grad(expected)(logits0, 'k1', True)
  np.testing.assert_allclose(
      g_k1, jax.grad(lambda l: kl(jax.nn.log_softmax(l), logp_ref))(logits0), atol=1e-6)
  np.testing.assert_allclose(
      g_k3, jax.grad(lambda l: kl(logp_ref, jax.nn.log_softmax(l)))(logits0), atol=1e-6)
  np.testing.assert_allclose(g_naive, 0., atol=1e-6)
  assert np.abs(g_k1).max() > 1e-2


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
def test_stage1_kl_constrains_turn1(estimator):
  """All rewards 0: on-policy gradient steps pull turn-1 tokens back to the reference."""
  B, S, V = 256, 4, 6
  turn = jnp.tile(jnp.array([0, 1, 1, 2]), (B, 1))
  rng = np.random.default_rng(2)
  logits_SxV = jnp.asarray(rng.normal(size=(S, V)) * 2, jnp.float32)
  ref_SxV = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(S, V)), jnp.float32))
  cfg = make_cfg(stage=1, beta2=1.0, beta1=0.0, kl_estimator=estimator)
  zeros = jnp.zeros(B)

  def loss(logits_SxV, tokens_BxS, cfg):
    logp = jax.nn.log_softmax(logits_SxV)[jnp.arange(S), tokens_BxS]
    return objective.score_loss(logp, ref_SxV[jnp.arange(S), tokens_BxS], turn,
                                zeros, zeros, cfg)[0]

  def turn1_kl(logits_SxV):
    logp = jax.nn.log_softmax(logits_SxV)[1:3]
    return float(jnp.sum(jnp.exp(logp) * (logp - ref_SxV[1:3])))

  def sample(logits_SxV, seed):  # on-policy tokens (NumPy: jax RNG compiles slowly on CPU)
    cdf_SxV = np.cumsum(np.asarray(jax.nn.softmax(logits_SxV)), axis=-1)
    u_BxS = np.random.default_rng(seed).random((B, S))
    return jnp.asarray((u_BxS[..., None] > cdf_SxV[:, :-1]).sum(-1), jnp.int32)

  step = jax.jit(lambda logits, tokens: logits - 0.5 * jax.grad(loss)(logits, tokens, cfg))
  tokens = sample(logits_SxV, 0)
  grad = jax.grad(loss)(logits_SxV, tokens, cfg)
  assert np.abs(grad[1:3]).max() > 1e-3
  no_kl = jax.grad(loss)(logits_SxV, tokens, make_cfg(stage=1, beta2=0., beta1=0.))
  np.testing.assert_array_equal(no_kl, 0.)  # rewards 0 and no KL: nothing moves

  kl0, logits = turn1_kl(logits_SxV), logits_SxV
  for i in range(30):
    logits = step(logits, sample(logits, i + 1))
  assert turn1_kl(logits) < 0.3 * kl0, (kl0, turn1_kl(logits))


def test_beta2_zero_leaves_turn1_alone():
  logits, tokens, logp_ref, turn, r1, r2 = tiny_batch()
  r2 = np.array([1., 0., 1., 1., 0., 0.])
  grad = jax.grad(lambda l: jax_loss(l, tokens, logp_ref, turn, r1, r2,
                                     make_cfg(stage=1, beta2=0.))[0])(
                                         jnp.asarray(logits, jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad)[turn == 1], 0.)
  assert np.abs(np.asarray(grad)[turn == 2]).max() > 1e-3


# ---------------------------------------------------------------- masking

def test_turn0_slots_never_enter():
  logits, tokens, logp_ref, turn, r1, r2 = tiny_batch()
  cfg = make_cfg(stage=2, kl_estimator='k3')
  f = jax.value_and_grad(lambda l, lr: jax_loss(l, tokens, lr, turn, r1, r2, cfg)[0])
  loss, grad = f(jnp.asarray(logits, jnp.float32), logp_ref)
  np.testing.assert_array_equal(np.asarray(grad)[turn == 0], 0.)
  # Garbage (even -inf) at prompt/instruction/pad slots changes nothing.
  logits2 = np.where((turn == 0)[..., None], 50 * np.random.default_rng(3).normal(
      size=logits.shape), logits)
  logp_ref2 = np.where(turn == 0, -np.inf, logp_ref)
  loss2, grad2 = f(jnp.asarray(logits2, jnp.float32), logp_ref2)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(grad2, grad, rtol=1e-6)
  assert np.isfinite(grad2).all()


def test_sft_loss_masks_turn0():
  logp = jnp.array([[-9., -1., -2., -9.], [-3., -9., -9., -4.]])
  turn = jnp.array([[0, 1, 2, 0], [1, 0, 0, 2]])
  np.testing.assert_allclose(objective.sft_loss(logp, turn), 10. / 4)


def test_bad_config_values_are_named():
  logits, tokens, logp_ref, turn, r1, r2 = tiny_batch()
  for bad in (dict(stage=3), dict(kl_estimator='k2'), dict(baseline='grpo'),
              dict(baseline='rloo', rloo_k=4)):
    with pytest.raises(ValueError, match=str(list(bad.values())[0])):
      jax_loss(logits, tokens, logp_ref, turn, r1, r2, make_cfg(**bad))


# ---------------------------------------------------------------- token_logprobs

def test_token_logprobs_chunked_equals_full_logits():
  from score_jax import model as model_lib
  config = model_lib.ModelConfig(vocab_size=32, embed_dim=32, hidden_dim=64,
                                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
  model = model_lib.Transformer(config)
  B, S = 3, 11
  rng = np.random.default_rng(4)
  tokens_np = rng.integers(4, 32, size=(B, S))
  valid_np = np.ones((B, S), bool)
  valid_np[0, :2] = False  # left-padded prompt
  valid_np[1, 5:7] = False  # pads after a short y1
  # Row 2 holds row 1's tokens packed to the left: same log-probs wherever pads sit.
  tokens_np[2, :9], valid_np[2, 9:] = tokens_np[1][valid_np[1]], False
  tokens, valid = jnp.asarray(tokens_np, jnp.int32), jnp.asarray(valid_np)
  positions, mask = (model_lib.positions_from_valid(valid),
                     model_lib.causal_attention_mask(valid))
  # Random weights without model.init: XLA:CPU takes ~10 s to compile the RNG inits.
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, positions, mask)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                        shapes['params'])

  # Reference: full [B, S, V] logits; each valid token predicted from the previous valid one.
  pairs = [(b, prev, t) for b in range(B)
           for prev, t in itertools.pairwise(np.flatnonzero(valid_np[b]))]
  b_i, prev_i, t_i = map(np.array, zip(*pairs))

  def full_logprobs(params):
    logits, _ = model.apply({'params': params}, tokens, positions, mask)
    logsm = jax.nn.log_softmax(logits.astype(jnp.float32))[b_i, prev_i]
    return logsm[np.arange(len(t_i)), tokens_np[b_i, t_i]], logsm

  want_lp, logsm = jax.jit(full_logprobs)(params)
  want_lp_BxS, want_ent_BxS = np.zeros((B, S)), np.zeros((B, S))
  want_lp_BxS[b_i, t_i] = want_lp
  want_ent_BxS[b_i, t_i] = -(np.exp(logsm) * logsm).sum(-1)

  fn = jax.jit(objective.token_logprobs, static_argnums=(0, 4))
  for chunk in (1, 4, 16):  # divides S, does not, exceeds it
    lp, ent = fn(model, params, tokens, valid, chunk)
    np.testing.assert_allclose(lp, want_lp_BxS, atol=2e-5, err_msg=f'chunk={chunk}')
    np.testing.assert_allclose(ent, want_ent_BxS, atol=2e-5, err_msg=f'chunk={chunk}')
  np.testing.assert_allclose(lp[2, :9], lp[1][valid_np[1]], atol=2e-5)

  # Gradients through the chunked (rematerialised) path match the full one.
  @jax.jit
  def grads(params):
    chunked = lambda p: jnp.sum(objective.token_logprobs(model, p, tokens, valid, 4)[0])
    return (jax.grad(lambda p: jnp.sum(full_logprobs(p)[0]))(params),
            jax.grad(chunked)(params))

  g_full, g_chunk = grads(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_full, g_chunk)
