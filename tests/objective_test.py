"""Tests of the per-turn RL objective: against a plain NumPy re-derivation, against the
previous release's two-turn loss, and its KL estimators against exact enumeration."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_jax import objective
from score_jax.objective import Objective


def make_obj(turns=2, train_turns=(1, 2), alpha=10., kl_coefs=(0.01,), reward_weights=(1.,),
             baseline='rloo', rloo_k=2, **kw):
  return Objective(turns=turns, train_turns=train_turns,
                   reward_weights=Objective.expand(reward_weights, turns), alpha=alpha,
                   kl_coefs=Objective.expand(kl_coefs, turns), baselines=(baseline,) * turns,
                   rloo_k=rloo_k, **kw)


STAGE1 = dict(train_turns=(2,), alpha=0., kl_coefs=(0.1, 0.01))
STAGE2 = dict(train_turns=(1, 2), alpha=10., kl_coefs=(0.01,))


# ---------------------------------------------------------------- NumPy reference

def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_advantages(r, obj):
  """r [B, T] -> A [B, T], written out per episode."""
  B, T = r.shape
  ret = np.zeros((B, T))
  for t in range(T):
    ret[:, t] = obj.reward_weights[t] * r[:, t] + (obj.alpha * (r[:, t] - r[:, t - 1]) if t else 0)
  adv = np.zeros((B, T))
  k = obj.rloo_k
  for t in range(T):
    if t + 1 not in obj.train_turns:
      continue
    for i in range(B):
      if obj.baselines[t] == 'batch_mean':
        b = ret[:, t].mean()
      elif obj.baselines[t] == 'rloo':
        b = np.mean([ret[j, t] for j in range(i // k * k, i // k * k + k) if j != i])
      else:
        b = 0.
      adv[i, t] = ret[i, t] - b
    if obj.normalize_advantages:
      adv[:, t] /= adv[:, t].std() + 1e-6
  return adv


def np_kl_weight(d, estimator, form):
  """d loss_KL / d logp per slot of one turn (d = 0 outside it), by hand."""
  if form == 'token':
    return d if estimator == 'k1' else 1 - np.exp(-d)
  if estimator == 'k1':  # the KL still to come: sum over s >= t
    return np.cumsum(d[:, ::-1], axis=1)[:, ::-1]
  before = np.cumsum(d, axis=1) - d  # log-ratio pi/ref of the prefix
  return np.exp(-before) * (1 - np.exp(-d))


def np_loss_and_grad(logits, tokens, logp_ref, turn, r, obj, onpolicy=None):
  """Loss and d loss / d logits, derived by hand."""
  B, T = r.shape
  logsm = np_log_softmax(logits)
  lp = np.take_along_axis(logsm, tokens[..., None], -1)[..., 0]
  onpolicy = np.ones((B, T), bool) if onpolicy is None else onpolicy
  masks = [((turn == t + 1) & onpolicy[:, t:t + 1]).astype(float) for t in range(T)]
  adv = np_advantages(r, obj)
  per_ep, dlp = np.zeros(B), np.zeros(lp.shape)
  for t in range(T):
    m = masks[t]
    d = m * (lp - logp_ref)
    if t + 1 in obj.train_turns:
      per_ep -= adv[:, t] * (m * lp).sum(1)
      dlp -= m * adv[:, t:t + 1]
    if obj.kl_form == 'token':
      surr = 0.5 * d**2 if obj.kl_estimator == 'k1' else np.exp(-d) + d - 1
    else:  # the surrogate's value is logp * weight
      surr = lp * np_kl_weight(d, obj.kl_estimator, obj.kl_form)
    per_ep += obj.kl_coefs[t] * (m * surr).sum(1)
    dlp += m * obj.kl_coefs[t] * np_kl_weight(d, obj.kl_estimator, obj.kl_form)
  onehot = np.eye(logits.shape[-1])[tokens]
  return per_ep.mean(), (dlp / B)[..., None] * (onehot - np.exp(logsm))


def jax_loss(logits_BxSxV, tokens_BxS, logp_ref_BxS, turn_BxS, r_BxT, obj, **kw):
  logp_BxS = jnp.take_along_axis(jax.nn.log_softmax(logits_BxSxV),
                                 tokens_BxS[..., None], -1)[..., 0]
  return objective.rl_loss(logp_BxS, logp_ref_BxS, turn_BxS, r_BxT, obj, **kw)


def tiny_batch(B=6, turns=2, L=3, V=5, seed=0):
  """[prompt (2) | y1 (L) | instr (1) | y2 (L) | ...] with ragged pads inside each buffer."""
  rng = np.random.default_rng(seed)
  S = 2 + turns * L + (turns - 1)
  logits = rng.normal(size=(B, S, V))
  tokens = rng.integers(0, V, size=(B, S))
  logp_ref = np.take_along_axis(np_log_softmax(rng.normal(size=(B, S, V))),
                                tokens[..., None], -1)[..., 0]
  turn = np.zeros((B, S), int)
  for b in range(B):
    for t in range(turns):
      start = 2 + t * (L + 1)
      turn[b, start:start + L - (b + t) % 3 // 2 * (1 + t % 2)] = t + 1
  r = rng.integers(0, 2, size=(B, turns)).astype(float)
  return logits, tokens, logp_ref, turn, r


# ---------------------------------------------------------------- loss and gradient

CASES = [dict(turns=2, kl_estimator=e, kl_form=f, baseline=b, rloo_k=k, **stage)
         for stage, e, f, (b, k) in itertools.product(
             (STAGE1, STAGE2), ('k1', 'k3'), ('token', 'sequence'),
             (('rloo', 2), ('rloo', 3), ('batch_mean', 2), ('none', 2)))]
CASES += [dict(turns=2, kl_estimator='k3', kl_form='sequence', baseline='rloo', rloo_k=3,
               normalize_advantages=True, **STAGE2)]
# Three attempts: Stage 1(b) (trains attempt 3, strong KL on 1-2), Stage 2 (all, bonus),
# and reward weights that differ per attempt.
CASES += [dict(turns=3, train_turns=(3,), alpha=0., kl_coefs=(0.1, 0.1, 0.01), kl_estimator=e,
               kl_form=f) for e, f in itertools.product(('k1', 'k3'), ('token', 'sequence'))]
CASES += [dict(turns=3, train_turns=(1, 2, 3), alpha=10., kl_coefs=(0.01,), kl_estimator=e,
               kl_form='sequence', reward_weights=(0.5, 1., 2.)) for e in ('k1', 'k3')]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_loss_and_grad_match_numpy(case):
  obj = make_obj(**case)
  logits, tokens, logp_ref, turn, r = tiny_batch(turns=obj.turns)
  want_loss, want_grad = np_loss_and_grad(logits, tokens, logp_ref, turn, r, obj)
  (loss, metrics), grad = jax.value_and_grad(jax_loss, has_aux=True)(
      jnp.asarray(logits, jnp.float32), tokens, logp_ref, turn, r, obj)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics['pg_loss'] + metrics['kl_loss'], loss, rtol=1e-5)
  assert np.abs(want_grad).max() > 1e-3


def test_offline_attempts_get_neither_gradient_nor_kl():
  obj = make_obj(**STAGE2, kl_form='sequence')
  logits, tokens, logp_ref, turn, r = tiny_batch()
  onpolicy = np.ones((6, 2), bool)
  onpolicy[3:, 0] = False  # the last three episodes' first attempts came from another model
  want_loss, want_grad = np_loss_and_grad(logits, tokens, logp_ref, turn, r, obj, onpolicy)
  (loss, _), grad = jax.value_and_grad(jax_loss, has_aux=True)(
      jnp.asarray(logits, jnp.float32), tokens, logp_ref, turn, r, obj, onpolicy_BxT=onpolicy)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  grad = np.asarray(grad)
  np.testing.assert_array_equal(grad[3:][turn[3:] == 1], 0.)
  assert np.abs(grad[3:][turn[3:] == 2]).max() > 1e-3 and np.abs(grad[:3][turn[:3] == 1]).max() > 1e-3


# ---------------------------------------------------------------- the previous release

def legacy_advantages(r1_B, r2_B, stage, alpha, baseline, k=None, normalize=False, eps=1e-6):
  """The previous release's two-turn advantages, verbatim."""
  r1_B = r1_B.astype(jnp.float32)
  r2_B = r2_B.astype(jnp.float32)
  if stage == 1:
    returns = (None, r2_B)
  else:
    returns = (r1_B, r2_B + alpha * (r2_B - r1_B))
  out = []
  for ret_B in returns:
    if ret_B is None:
      out.append(jnp.zeros_like(r1_B))
      continue
    adv_B = ret_B - objective._baseline(ret_B, baseline, k)
    if normalize:
      adv_B = adv_B / (adv_B.std() + eps)
    out.append(adv_B)
  return tuple(out)


def legacy_score_loss(logp_pi_BxS, logp_ref_BxS, turn_BxS, r1_B, r2_B, cfg):
  """The previous release's two-turn SCoRe loss, verbatim (per-token KL surrogate)."""
  m1_BxS = turn_BxS == 1
  m2_BxS = turn_BxS == 2
  m_BxS = m1_BxS | m2_BxS
  logp_pi_BxS = jnp.where(m_BxS, logp_pi_BxS, 0.)
  logp_ref_BxS = jnp.where(m_BxS, logp_ref_BxS, 0.)

  def turn_sum(x_BxS, m_BxS):
    return jnp.sum(jnp.where(m_BxS, x_BxS, 0.), axis=1)

  a1_B, a2_B = jax.lax.stop_gradient(legacy_advantages(
      r1_B, r2_B, cfg.stage, cfg.alpha, cfg.baseline, cfg.rloo_k, cfg.normalize_advantages))
  pg_B = -(a1_B * turn_sum(logp_pi_BxS, m1_BxS) + a2_B * turn_sum(logp_pi_BxS, m2_BxS))
  _, surrogate_BxS = objective.kl_terms(logp_pi_BxS, logp_ref_BxS, cfg.kl_estimator)
  c1, c2 = (cfg.beta2, cfg.beta1) if cfg.stage == 1 else (cfg.beta1, cfg.beta1)
  kl_B = c1 * turn_sum(surrogate_BxS, m1_BxS) + c2 * turn_sum(surrogate_BxS, m2_BxS)
  return jnp.mean(pg_B + kl_B)


@pytest.mark.parametrize('stage,estimator,baseline', list(itertools.product(
    (1, 2), ('k1', 'k3'), ('rloo', 'batch_mean', 'none'))))
def test_two_turns_equal_the_previous_release_exactly(stage, estimator, baseline):
  """Stage I / II as settings of the per-turn loss, with the per-token KL, give today's
  loss and gradient bit for bit."""
  cfg = ml_collections.ConfigDict(dict(stage=stage, alpha=10., beta1=0.01, beta2=0.1,
                                       kl_estimator=estimator, baseline=baseline, rloo_k=2,
                                       normalize_advantages=False))
  obj = make_obj(**(STAGE1 if stage == 1 else STAGE2), kl_estimator=estimator, kl_form='token',
                 baseline=baseline)
  logits, tokens, logp_ref, turn, r = tiny_batch()
  logp = lambda l: jnp.take_along_axis(jax.nn.log_softmax(l), tokens[..., None], -1)[..., 0]
  r = jnp.asarray(r, jnp.float32)
  old = jax.value_and_grad(lambda l: legacy_score_loss(logp(l), logp_ref, turn, r[:, 0], r[:, 1],
                                                      cfg))
  new = jax.value_and_grad(lambda l: objective.rl_loss(logp(l), logp_ref, turn, r, obj)[0])
  x = jnp.asarray(logits, jnp.float32)
  with jax.disable_jit():  # Op by op, the two compute the same floats in the same order.
    (old_loss, old_grad), (new_loss, new_grad) = old(x), new(x)
  np.testing.assert_array_equal(new_loss, old_loss)
  np.testing.assert_array_equal(new_grad, old_grad)
  # Compiled, XLA may fuse and order a sum differently: equal to float32 rounding.
  (old_loss, old_grad), (new_loss, new_grad) = jax.jit(old)(x), jax.jit(new)(x)
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
  np.testing.assert_allclose(new_grad, old_grad, rtol=1e-6, atol=1e-9)


def test_advantages_by_hand():
  r = jnp.array([[0., 1.], [1., 1.], [1., 0.], [0., 0.]])
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
    got = objective.advantages(r, make_obj(**(STAGE1 if stage == 1 else STAGE2),
                                           baseline=baseline))
    np.testing.assert_allclose(got[:, 0], a1, err_msg=f'{stage} {baseline}')
    np.testing.assert_allclose(got[:, 1], a2, err_msg=f'{stage} {baseline}')
  # k = 4: everyone is compared with the other three.
  a = objective.advantages(r, make_obj(**STAGE1, rloo_k=4))
  np.testing.assert_allclose(a[:, 1], [2 / 3, 2 / 3, -2 / 3, -2 / 3], rtol=1e-6)
  # Three attempts, bonus on each gain: returns r_t + 10 (r_t - r_{t-1}).
  r3 = jnp.array([[0., 1., 1.], [1., 0., 1.]])
  np.testing.assert_allclose(objective.returns(r3, make_obj(turns=3, train_turns=(1, 2, 3))),
                             [[0, 11, 1], [1, -10, 11]])


def test_stage2_bonus_ranks_flips():
  # wrong->right, right->right, right->wrong, wrong->wrong
  r = jnp.array([[0., 1.], [1., 1.], [1., 0.], [0., 0.]])
  a2 = objective.advantages(r, make_obj(**STAGE2, baseline='none'))[:, 1]
  np.testing.assert_allclose(a2, [11., 1., -10., 0.])
  a2 = objective.advantages(r, make_obj(**STAGE2, baseline='batch_mean'))[:, 1]
  assert a2[0] > a2[1] > a2[3] > a2[2] and a2[2] < 0 < a2[0]


# ---------------------------------------------------------------- the KL's gradient


def test_kl_surrogates_have_the_right_expected_gradient_per_token():
  """One token: E_pi[grad surrogate] is the gradient of a true KL; E_pi[grad d] = 0."""
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


def _two_token_policy(seed=0):
  """A tabular policy over 2 tokens of 3 symbols: logits of the first token [3] and of the
  second given the first [3, 3]; the reference likewise. All 9 sequences enumerated."""
  rng = np.random.default_rng(seed)
  theta = (jnp.asarray(rng.normal(size=3), jnp.float32),
           jnp.asarray(rng.normal(size=(3, 3)), jnp.float32))
  ref = (jax.nn.log_softmax(jnp.asarray(rng.normal(size=3), jnp.float32)),
         jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), axis=-1))
  seqs = np.array(list(itertools.product(range(3), range(3))))  # [9, 2]

  def token_logps(theta):
    """[9, 2] log pi of each sequence's tokens."""
    first = jax.nn.log_softmax(theta[0])[seqs[:, 0]]
    second = jax.nn.log_softmax(theta[1], axis=-1)[seqs[:, 0], seqs[:, 1]]
    return jnp.stack([first, second], 1)
  ref_logps = jnp.stack([ref[0][seqs[:, 0]], ref[1][seqs[:, 0], seqs[:, 1]]], 1)
  return theta, ref_logps, token_logps


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
def test_sequence_kl_gradient_is_exact_by_enumeration(estimator):
  """E_pi[grad of the summed 'sequence' surrogate] equals the exact gradient of the
  sequence KL (k1: KL(pi || ref); k3: KL(ref || pi)); the 'token' form does not."""
  theta, ref_logps, token_logps = _two_token_policy()
  mask = jnp.ones((9, 2), bool)

  def exact_kl(theta):
    logp_pi, logp_ref = token_logps(theta).sum(1), ref_logps.sum(1)
    if estimator == 'k1':
      return jnp.sum(jnp.exp(logp_pi) * (logp_pi - logp_ref))
    return jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp_pi))

  def expected_surrogate(theta, form):
    p_seq = jax.lax.stop_gradient(jnp.exp(token_logps(theta).sum(1)))  # sampling probability
    surrogate = objective.kl_surrogate(token_logps(theta), ref_logps, mask, estimator, form)
    return jnp.sum(p_seq * surrogate.sum(1))

  want = jax.grad(exact_kl)(theta)
  got = jax.grad(expected_surrogate)(theta, 'sequence')
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, atol=1e-6)
  # The per-token form is not the gradient of the sequence KL. For k1 it ignores how the
  # first token changes the second one's KL (the first token's logits get a different
  # gradient, the last token's agree); for k3 it weighs the second token's per-position
  # KL by the policy's prefix instead of the reference's (so there the second differs).
  token = jax.grad(expected_surrogate)(theta, 'token')
  differs, agrees = (0, 1) if estimator == 'k1' else (1, 0)
  assert np.abs(np.asarray(token[differs]) - np.asarray(want[differs])).max() > 1e-2
  np.testing.assert_allclose(token[agrees], want[agrees], atol=1e-6)


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
@pytest.mark.parametrize('form', ['token', 'sequence'])
def test_stage1_kl_constrains_turn1(estimator, form):
  """All rewards 0: on-policy gradient steps pull turn-1 tokens back to the reference."""
  B, S, V = 256, 4, 6
  turn = jnp.tile(jnp.array([0, 1, 1, 2]), (B, 1))
  rng = np.random.default_rng(2)
  logits_SxV = jnp.asarray(rng.normal(size=(S, V)) * 2, jnp.float32)
  ref_SxV = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(S, V)), jnp.float32))
  obj = make_obj(train_turns=(2,), alpha=0., kl_coefs=(1.0, 0.0), kl_estimator=estimator,
                 kl_form=form)
  zeros = jnp.zeros((B, 2))

  def loss(logits_SxV, tokens_BxS, obj):
    logp = jax.nn.log_softmax(logits_SxV)[jnp.arange(S), tokens_BxS]
    return objective.rl_loss(logp, ref_SxV[jnp.arange(S), tokens_BxS], turn, zeros, obj)[0]

  def turn1_kl(logits_SxV):
    logp = jax.nn.log_softmax(logits_SxV)[1:3]
    return float(jnp.sum(jnp.exp(logp) * (logp - ref_SxV[1:3])))

  def sample(logits_SxV, seed):  # on-policy tokens (NumPy: jax RNG compiles slowly on CPU)
    cdf_SxV = np.cumsum(np.asarray(jax.nn.softmax(logits_SxV)), axis=-1)
    u_BxS = np.random.default_rng(seed).random((B, S))
    return jnp.asarray((u_BxS[..., None] > cdf_SxV[:, :-1]).sum(-1), jnp.int32)

  step = jax.jit(lambda logits, tokens: logits - 0.5 * jax.grad(loss)(logits, tokens, obj))
  tokens = sample(logits_SxV, 0)
  grad = jax.grad(loss)(logits_SxV, tokens, obj)
  assert np.abs(grad[1:3]).max() > 1e-3
  no_kl = jax.grad(loss)(logits_SxV, tokens, make_obj(train_turns=(2,), alpha=0.,
                                                      kl_coefs=(0.,), kl_form=form))
  np.testing.assert_array_equal(no_kl, 0.)  # rewards 0 and no KL: nothing moves

  kl0, logits = turn1_kl(logits_SxV), logits_SxV
  for i in range(30):
    logits = step(logits, sample(logits, i + 1))
  assert turn1_kl(logits) < 0.3 * kl0, (kl0, turn1_kl(logits))


def test_beta2_zero_leaves_turn1_alone():
  logits, tokens, logp_ref, turn, r = tiny_batch()
  r[:, 1] = [1., 0., 1., 1., 0., 0.]
  obj = make_obj(train_turns=(2,), alpha=0., kl_coefs=(0., 0.01))
  grad = jax.grad(lambda l: jax_loss(l, tokens, logp_ref, turn, r, obj)[0])(
      jnp.asarray(logits, jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad)[turn == 1], 0.)
  assert np.abs(np.asarray(grad)[turn == 2]).max() > 1e-3


def test_kl_scale_multiplies_the_coefficients():
  logits, tokens, logp_ref, turn, r = tiny_batch()
  x = jnp.asarray(logits, jnp.float32)
  obj = make_obj(**STAGE1)
  scaled = jax_loss(x, tokens, logp_ref, turn, r, obj, kl_scale_T=jnp.array([3., 1.]))[1]
  by_hand = jax_loss(x, tokens, logp_ref, turn, r, make_obj(train_turns=(2,), alpha=0.,
                                                             kl_coefs=(0.3, 0.01)))[1]
  np.testing.assert_allclose(scaled['kl_loss'], by_hand['kl_loss'], rtol=1e-6)
  np.testing.assert_allclose(scaled['kl_coef1'], 0.3, rtol=1e-6)


# ---------------------------------------------------------------- masking

def test_turn0_slots_never_enter():
  logits, tokens, logp_ref, turn, r = tiny_batch()
  obj = make_obj(**STAGE2, kl_estimator='k3')
  f = jax.value_and_grad(lambda l, lr: jax_loss(l, tokens, lr, turn, r, obj)[0])
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


def test_sft_loss_masks_turn0_and_other_attempts():
  logp = jnp.array([[-9., -1., -2., -9.], [-3., -9., -9., -4.]])
  turn = jnp.array([[0, 1, 2, 0], [1, 0, 0, 2]])
  np.testing.assert_allclose(objective.sft_loss(logp, turn), 10. / 4)
  np.testing.assert_allclose(objective.sft_loss(logp, turn, (2,)), 6. / 2)


def test_bad_objective_values_are_named():
  for bad, match in ((dict(kl_estimator='k2'), 'k2'), (dict(baseline='grpo'), 'grpo'),
                     (dict(kl_form='seq'), 'seq'), (dict(train_turns=(3,)), 'train_turns')):
    with pytest.raises(ValueError, match=match):
      make_obj(**bad)
  logits, tokens, logp_ref, turn, r = tiny_batch()
  with pytest.raises(ValueError, match='rloo'):
    jax_loss(logits, tokens, logp_ref, turn, r, make_obj(rloo_k=4))
  with pytest.raises(ValueError, match='entries'):
    Objective.expand((0.1, 0.2, 0.3), 2)
  assert Objective.expand((0.1, 0.2), 3) == (0.1, 0.2, 0.2)


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
