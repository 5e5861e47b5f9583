"""The SCoRe objective (SCORE.md "Objectives"), as pure functions over arrays.

  Stage I:  maximise E[r2]                    - beta2 * KL_1 - beta1 * KL_2
  Stage II: maximise E[r1 + r2 + alpha*(r2-r1)] - beta1 * (KL_1 + KL_2)

Per-turn credit with discount 0: turn-1 tokens are credited with r1 (Stage II) or
nothing (Stage I, where only the KL acts on them); turn-2 tokens with r2 (+ the bonus
in Stage II). Only model tokens (turn 1 or 2) ever enter a loss; turn 0 marks prompt,
instruction and pads.
"""
import jax
import jax.numpy as jnp

from score_jax import model as model_lib

STAGES = (1, 2)
KL_ESTIMATORS = ('k1', 'k3')
BASELINES = ('rloo', 'batch_mean', 'none')


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {allowed}.')


def token_logprobs(model, params, tokens_BxS, valid_BxS, chunk_size):
  """Log-prob and predictive entropy of each valid token given the valid ones before it.

  A token is predicted from the hidden state of the nearest valid slot before it (in
  the compact layout: slot t-1), the same rule the KV-cached sampler follows, so the
  result does not depend on where pads sit. Slots with no valid predecessor, and
  invalid slots, get 0. Logits are formed chunk by chunk along S (rematerialised in
  the backward pass), so [B, S, V] float32 logits never exist whole.
  Returns (logp_BxS, entropy_BxS), float32.
  """
  B, S = tokens_BxS.shape
  hidden_BxSxD, _ = model.apply(
      {'params': params}, tokens_BxS, model_lib.positions_from_valid(valid_BxS),
      model_lib.causal_attention_mask(valid_BxS), return_hidden=True)

  # prev_BxS[t] = last valid slot strictly before t (-1 if none).
  last_valid_BxS = jax.lax.cummax(jnp.where(valid_BxS, jnp.arange(S), -1), axis=1)
  prev_BxS = jnp.pad(last_valid_BxS[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  scored_BxS = valid_BxS & (prev_BxS >= 0)
  pred_BxSxD = jnp.take_along_axis(
      hidden_BxSxD, jnp.maximum(prev_BxS, 0)[..., None], axis=1)

  C = int(chunk_size)
  n = -(-S // C)
  pad = n * C - S
  h_NxBxCxD = jnp.pad(pred_BxSxD, ((0, 0), (0, pad), (0, 0)))
  h_NxBxCxD = h_NxBxCxD.reshape(B, n, C, -1).swapaxes(0, 1)
  tok_NxBxC = jnp.pad(tokens_BxS, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(params, h_BxCxD, tok_BxC):
    logits_BxCxV = model.apply({'params': params}, h_BxCxD, method='logits')
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV.astype(jnp.float32), axis=-1)
    logp_BxC = jnp.take_along_axis(logp_BxCxV, tok_BxC[..., None], axis=-1)[..., 0]
    entropy_BxC = -jnp.sum(jnp.exp(logp_BxCxV) * logp_BxCxV, axis=-1)
    return logp_BxC, entropy_BxC

  def body(carry, xs):
    return carry, chunk(params, *xs)

  _, (logp_NxBxC, ent_NxBxC) = jax.lax.scan(body, None, (h_NxBxCxD, tok_NxBxC))
  logp_BxS = logp_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :S]
  entropy_BxS = ent_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :S]
  return jnp.where(scored_BxS, logp_BxS, 0.), jnp.where(scored_BxS, entropy_BxS, 0.)


def kl_terms(logp_pi, logp_ref, estimator):
  """Per-token KL on the sampled tokens: (value, surrogate whose gradient we follow).

  d = log pi - log ref. Using d itself as a loss is useless: E_pi[grad d] = E_pi[grad
  log pi] = 0, so it puts no pull on the policy. Instead:
    'k1': value d; surrogate d**2/2, pathwise gradient d * grad log pi = the
          score-function estimate of grad KL(pi || ref).
    'k3': value and surrogate exp(-d) + d - 1 (Schulman; GRPO); pathwise gradient
          (1 - ref/pi) grad log pi, an unbiased estimate of grad KL(ref || pi).
  The reference is frozen: no gradient reaches it.
  """
  _check('kl_estimator', estimator, KL_ESTIMATORS)
  d = logp_pi - jax.lax.stop_gradient(logp_ref)
  if estimator == 'k1':
    return d, 0.5 * d**2
  k3 = jnp.exp(-d) + d - 1.
  return k3, k3


def _baseline(returns_B, baseline, k):
  _check('baseline', baseline, BASELINES)
  if baseline == 'none':
    return jnp.zeros_like(returns_B)
  if baseline == 'batch_mean':
    return jnp.full_like(returns_B, returns_B.mean())
  # RLOO: episodes come in groups of k consecutive samples of one prompt; each is
  # compared with the mean of the other k-1.
  if not k or k < 2 or returns_B.shape[0] % k:
    raise ValueError(f'rloo needs k >= 2 dividing the batch; got k={k}, '
                     f'batch={returns_B.shape[0]}.')
  group_PxK = returns_B.reshape(-1, k)
  others_PxK = (group_PxK.sum(axis=1, keepdims=True) - group_PxK) / (k - 1)
  return others_PxK.reshape(-1)


def advantages(r1_B, r2_B, stage, alpha, baseline, k=None, normalize=False,
               eps=1e-6):
  """Per-turn advantages (A1_B, A2_B) with discount 0; see the module docstring."""
  _check('stage', stage, STAGES)
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
    adv_B = ret_B - _baseline(ret_B, baseline, k)
    if normalize:
      adv_B = adv_B / (adv_B.std() + eps)
    out.append(adv_B)
  return tuple(out)


def score_loss(logp_pi_BxS, logp_ref_BxS, turn_BxS, r1_B, r2_B, cfg, adv_B=None):
  """The SCoRe loss (to minimise) for one batch of two-turn episodes, and metrics.

  cfg fields: stage, alpha, beta1, beta2, kl_estimator, baseline, rloo_k,
  normalize_advantages. The KL enters as a sequence-level sum per turn, so the paper's
  betas weigh sequence KL; the loss is the mean over episodes. `adv_B` = (A1_B, A2_B)
  given by the caller replaces `advantages(r1_B, r2_B, ...)`: a microbatch of a larger
  batch takes its advantages from the whole batch (baselines need every episode).
  """
  _check('stage', cfg.stage, STAGES)
  m1_BxS = turn_BxS == 1
  m2_BxS = turn_BxS == 2
  m_BxS = m1_BxS | m2_BxS
  # Masking the inputs (not only the products) keeps garbage at turn-0 slots from
  # leaking into values or, via 0 * inf, into gradients.
  logp_pi_BxS = jnp.where(m_BxS, logp_pi_BxS, 0.)
  logp_ref_BxS = jnp.where(m_BxS, logp_ref_BxS, 0.)

  def turn_sum(x_BxS, m_BxS):
    return jnp.sum(jnp.where(m_BxS, x_BxS, 0.), axis=1)

  if adv_B is None:
    adv_B = advantages(r1_B, r2_B, cfg.stage, cfg.alpha, cfg.baseline, cfg.rloo_k,
                       cfg.normalize_advantages)
  a1_B, a2_B = jax.lax.stop_gradient(adv_B)
  pg_B = -(a1_B * turn_sum(logp_pi_BxS, m1_BxS) +
           a2_B * turn_sum(logp_pi_BxS, m2_BxS))

  _, surrogate_BxS = kl_terms(logp_pi_BxS, logp_ref_BxS, cfg.kl_estimator)
  c1, c2 = (cfg.beta2, cfg.beta1) if cfg.stage == 1 else (cfg.beta1, cfg.beta1)
  kl_B = c1 * turn_sum(surrogate_BxS, m1_BxS) + c2 * turn_sum(surrogate_BxS, m2_BxS)

  loss = jnp.mean(pg_B + kl_B)
  metrics = {
      'loss': loss, 'pg_loss': pg_B.mean(), 'kl_loss': kl_B.mean(),
      'adv1_mean': a1_B.mean(), 'adv1_std': a1_B.std(),
      'adv2_mean': a2_B.mean(), 'adv2_std': a2_B.std(),
      'r1': jnp.mean(r1_B), 'r2': jnp.mean(r2_B),
      'len1': m1_BxS.sum(axis=1).mean(), 'len2': m2_BxS.sum(axis=1).mean(),
  }
  for est in KL_ESTIMATORS:
    value_BxS, _ = jax.lax.stop_gradient(kl_terms(logp_pi_BxS, logp_ref_BxS, est))
    for t, m in ((1, m1_BxS), (2, m2_BxS)):
      metrics[f'kl{t}_{est}'] = turn_sum(value_BxS, m).mean()
  for t in (1, 2):
    metrics[f'kl{t}'] = metrics[f'kl{t}_{cfg.kl_estimator}']
  return loss, metrics


def sft_loss(logp_BxS, turn_BxS):
  """Mean negative log-likelihood over model tokens (turn > 0)."""
  m_BxS = turn_BxS > 0
  nll = -jnp.sum(jnp.where(m_BxS, logp_BxS, 0.))
  return nll / jnp.maximum(m_BxS.sum(), 1)
