"""The SCoRe objective (SCORE.md "Objectives") for T turns, as pure functions over arrays.

For episode b and turn t = 1..T, with binary rewards r_t:

  return     R_t = w_t r_t + alpha (r_t - r_{t-1})       (the shaping bonus only for t >= 2)
  advantage  A_t = R_t - baseline_t(R_t)                  (discount 0: a turn's own return)
  loss       sum_{t trained} -A_t sum_{tokens of t} log pi  +  sum_t beta_t KL_t

averaged over episodes; KL_t = KL(pi(.|x_t) || ref(.|x_t)) over the tokens of turn t.
A turn that is not trained gets no policy gradient (it is sampled, and its KL still acts);
Stage I and Stage II are two settings of this one loss:

  Stage I:   trained (2,),   alpha 0,   beta = (beta2, beta1)   maximise E[r2] - beta2 KL_1 - beta1 KL_2
  Stage II:  trained (1, 2), alpha,     beta = (beta1, beta1)   maximise E[r1 + r2 + alpha (r2 - r1)] - ...

Only model tokens enter a loss: `turn_BxS` is t on the valid tokens of attempt t and 0 on
prompt, instruction and pad slots.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from score_jax import model as model_lib

KL_ESTIMATORS = ('k1', 'k3')  # which KL, see `kl_terms`
KL_FORMS = ('sequence', 'token')  # which gradient of it, see `kl_surrogate`
BASELINES = ('rloo', 'batch_mean', 'none')
# Log prefix-ratios are clipped here in the sequence k3 estimator: exp(20) ~ 5e8 is a
# policy that has left the reference far behind, not a sample worth that weight.
_MAX_LOG_RATIO = 20.0


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static (hashable) settings of the RL loss for episodes of `turns` attempts.

  Per-turn tuples have one entry per turn (`expand` fills them from shorter config
  tuples); turns are 1-based in `train_turns`.
  """
  turns: int
  train_turns: tuple[int, ...]
  reward_weights: tuple[float, ...]
  alpha: float
  kl_coefs: tuple[float, ...]
  baselines: tuple[str, ...]
  kl_estimator: str = 'k1'
  kl_form: str = 'sequence'
  rloo_k: int = 0
  normalize_advantages: bool = False

  def __post_init__(self):
    _check('kl_estimator', self.kl_estimator, KL_ESTIMATORS)
    _check('kl_form', self.kl_form, KL_FORMS)
    for b in self.baselines:
      _check('baseline', b, BASELINES)
    T = self.turns
    for name in ('reward_weights', 'kl_coefs', 'baselines'):
      if len(getattr(self, name)) != T:
        raise ValueError(f'{name}={getattr(self, name)} needs one entry per turn ({T})')
    if not self.train_turns or any(not 1 <= t <= T for t in self.train_turns):
      raise ValueError(f'train_turns={self.train_turns} must name turns in 1..{T}')

  @staticmethod
  def expand(values, turns: int) -> tuple:
    """A config tuple per turn; the last entry repeats for later turns ((0.01,) = all)."""
    values = tuple(values)
    if not values or len(values) > turns:
      raise ValueError(f'{values}: needs 1 to {turns} entries (the last one repeats)')
    return values + values[-1:] * (turns - len(values))


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {allowed}.')


def token_logprobs(model, params, tokens_BxS, valid_BxS, chunk_size, with_entropy=True):
  """Log-prob and predictive entropy of each valid token given the valid ones before it.

  A token is predicted from the hidden state of the nearest valid slot before it (in
  the compact layout: slot t-1), the same rule the KV-cached sampler follows, so the
  result does not depend on where pads sit. Slots with no valid predecessor, and
  invalid slots, get 0. Logits are formed chunk by chunk along S (rematerialised in
  the backward pass), so [B, S, V] float32 logits never exist whole.
  Returns (logp_BxS, entropy_BxS), float32; entropy_BxS is None without `with_entropy`
  (the reference and SFT passes: at a 50-256k vocabulary the entropy costs about what
  the log-softmax does).
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
    if not with_entropy:
      return logp_BxC, None
    return logp_BxC, -jnp.sum(jnp.exp(logp_BxCxV) * logp_BxCxV, axis=-1)

  def body(carry, xs):
    return carry, chunk(params, *xs)

  _, (logp_NxBxC, ent_NxBxC) = jax.lax.scan(body, None, (h_NxBxCxD, tok_NxBxC))
  unchunk = lambda x_NxBxC: jnp.where(
      scored_BxS, x_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :S], 0.)
  return unchunk(logp_NxBxC), None if ent_NxBxC is None else unchunk(ent_NxBxC)


# ---------------------------------------------------------------------------------------
# The KL to the reference.


def kl_terms(logp_pi, logp_ref, estimator):
  """Per-token KL on the sampled tokens: (value, token-form surrogate).

  d = log pi - log ref. Using d itself as a loss is useless: E_pi[grad d] = E_pi[grad
  log pi] = 0, so it puts no pull on the policy. Instead:
    'k1': value d (sums to the sampled sequence's log-ratio, an unbiased estimate of
          KL(pi || ref)); surrogate d**2/2, gradient d grad log pi.
    'k3': value exp(-d) + d - 1 (Schulman; GRPO), an unbiased estimate of the
          per-position KL(ref || pi); surrogate the same, gradient (1 - ref/pi) grad log pi.
  The reference is frozen: no gradient reaches it.
  """
  _check('kl_estimator', estimator, KL_ESTIMATORS)
  d = logp_pi - jax.lax.stop_gradient(logp_ref)
  if estimator == 'k1':
    return d, 0.5 * d**2
  k3 = jnp.exp(-d) + d - 1.
  return k3, k3


def _reverse_cumsum(x_BxS):
  return jnp.flip(jnp.cumsum(jnp.flip(x_BxS, 1), axis=1), 1)


def kl_surrogate(logp_pi_BxS, logp_ref_BxS, mask_BxS, estimator, form):
  """A per-token loss whose gradient, summed over one turn's tokens (`mask_BxS`), has the
  expectation that the form names.

  'token': the per-token surrogates of `kl_terms`. Their expected gradient is
    sum_t E[grad KL(pi(.|y<t) || ref(.|y<t))] with the prefix y<t held fixed: it ignores
    how the early tokens change the KL of the later ones, so it is not the gradient of
    the turn's sequence KL that the paper's betas weigh.
  'sequence': the exact gradient of the turn's sequence KL (score function, causality):
    k1, KL(pi || ref):  grad = E[sum_t grad log pi_t * sum_{s >= t} d_s]
                        (each token weighted by the KL still to come within the turn);
    k3, KL(ref || pi):  grad = E[sum_t grad log pi_t * rho_{<t} (1 - exp(-d_t))]
                        with the prefix ratio rho_{<t} = prod_{s<t} ref_s / pi_s.
  Both are proved against exact enumeration in tests/objective_test.py.
  """
  _check('kl_form', form, KL_FORMS)
  _, surrogate_BxS = kl_terms(logp_pi_BxS, logp_ref_BxS, estimator)
  if form == 'token':
    return surrogate_BxS
  d_BxS = jax.lax.stop_gradient(jnp.where(mask_BxS, logp_pi_BxS - logp_ref_BxS, 0.))
  if estimator == 'k1':
    weight_BxS = _reverse_cumsum(d_BxS)
  else:
    log_ratio_before_BxS = -(jnp.cumsum(d_BxS, axis=1) - d_BxS)  # log rho_{<t}
    log_ratio_before_BxS = jnp.clip(log_ratio_before_BxS, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    weight_BxS = jnp.exp(log_ratio_before_BxS) * (1. - jnp.exp(-d_BxS))
  return logp_pi_BxS * weight_BxS


# ---------------------------------------------------------------------------------------
# Returns and advantages.


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


def returns(r_BxT, obj: Objective):
  """R_t = w_t r_t + alpha (r_t - r_{t-1}), the bonus for t >= 2; [B, T] float32."""
  r_BxT = r_BxT.astype(jnp.float32)
  out = []
  for t in range(obj.turns):
    ret_B = obj.reward_weights[t] * r_BxT[:, t]
    if t and obj.alpha:
      ret_B = ret_B + obj.alpha * (r_BxT[:, t] - r_BxT[:, t - 1])
    out.append(ret_B)
  return jnp.stack(out, axis=1)


def advantages(r_BxT, obj: Objective, eps=1e-6):
  """A_BxT (discount 0, a baseline per turn); 0 on turns that are not trained."""
  ret_BxT = returns(r_BxT, obj)
  out = []
  for t in range(obj.turns):
    if t + 1 not in obj.train_turns:
      out.append(jnp.zeros_like(ret_BxT[:, t]))
      continue
    adv_B = ret_BxT[:, t] - _baseline(ret_BxT[:, t], obj.baselines[t], obj.rloo_k)
    if obj.normalize_advantages:
      adv_B = adv_B / (adv_B.std() + eps)
    out.append(adv_B)
  return jnp.stack(out, axis=1)


# ---------------------------------------------------------------------------------------
# The loss.


def rl_loss(logp_pi_BxS, logp_ref_BxS, turn_BxS, r_BxT, obj: Objective, adv_BxT=None,
            onpolicy_BxT=None, kl_scale_T=None):
  """The loss (to minimise) for one batch of T-turn episodes, and metrics.

  `adv_BxT` given by the caller replaces `advantages(r_BxT, obj)`: a microbatch of a
  larger batch takes its advantages from the whole batch (baselines need every
  episode). `onpolicy_BxT` (bool) marks attempts sampled from the policy; the others
  (offline first attempts from another model) get neither policy gradient nor KL, since
  both are expectations under the policy. `kl_scale_T` multiplies the KL coefficients
  (an adaptive beta). The KL enters as a sum per turn, so the betas weigh sequence KL.
  """
  T = obj.turns
  m_BxS = (turn_BxS >= 1) & (turn_BxS <= T)
  # Masking the inputs (not only the products) keeps garbage at turn-0 slots from
  # leaking into values or, via 0 * inf, into gradients.
  logp_pi_BxS = jnp.where(m_BxS, logp_pi_BxS, 0.)
  logp_ref_BxS = jnp.where(m_BxS, logp_ref_BxS, 0.)

  def turn_sum(x_BxS, mt_BxS):
    return jnp.sum(jnp.where(mt_BxS, x_BxS, 0.), axis=1)

  turn_masks = [turn_BxS == t for t in range(1, T + 1)]
  loss_masks = turn_masks
  if onpolicy_BxT is not None:
    loss_masks = [m & onpolicy_BxT[:, t, None] for t, m in enumerate(turn_masks)]
  if adv_BxT is None:
    adv_BxT = advantages(r_BxT, obj)
  adv_BxT = jax.lax.stop_gradient(adv_BxT)

  pg_terms = [adv_BxT[:, t - 1] * turn_sum(logp_pi_BxS, loss_masks[t - 1])
              for t in obj.train_turns]
  pg_B = -functools.reduce(jnp.add, pg_terms)

  kl_terms_ = []
  for t in range(T):
    surrogate_BxS = kl_surrogate(logp_pi_BxS, logp_ref_BxS, loss_masks[t], obj.kl_estimator,
                                 obj.kl_form)
    coef = obj.kl_coefs[t] if kl_scale_T is None else obj.kl_coefs[t] * kl_scale_T[t]
    kl_terms_.append(coef * turn_sum(surrogate_BxS, loss_masks[t]))
  kl_B = functools.reduce(jnp.add, kl_terms_)

  loss = jnp.mean(pg_B + kl_B)
  metrics = {'loss': loss, 'pg_loss': pg_B.mean(), 'kl_loss': jnp.mean(kl_B)}
  for t in range(T):
    n = t + 1
    metrics.update({f'adv{n}_mean': adv_BxT[:, t].mean(), f'adv{n}_std': adv_BxT[:, t].std(),
                    f'r{n}': jnp.mean(r_BxT[:, t]),
                    f'len{n}': turn_masks[t].sum(axis=1).mean()})
    for est in KL_ESTIMATORS:
      value_BxS, _ = jax.lax.stop_gradient(kl_terms(logp_pi_BxS, logp_ref_BxS, est))
      metrics[f'kl{n}_{est}'] = turn_sum(value_BxS, turn_masks[t]).mean()
    metrics[f'kl{n}'] = metrics[f'kl{n}_{obj.kl_estimator}']
    if kl_scale_T is not None:
      metrics[f'kl_coef{n}'] = obj.kl_coefs[t] * kl_scale_T[t]
  return loss, metrics


def sft_loss(logp_BxS, turn_BxS, loss_turns=()):
  """Mean negative log-likelihood over model tokens (turn > 0), or over the tokens of
  `loss_turns` only (STaR and Pair-SFT train the corrected attempt, not the first)."""
  if loss_turns:
    m_BxS = jnp.isin(turn_BxS, jnp.asarray(loss_turns, turn_BxS.dtype))
  else:
    m_BxS = turn_BxS > 0
  nll = -jnp.sum(jnp.where(m_BxS, logp_BxS, 0.))
  return nll / jnp.maximum(m_BxS.sum(), 1)
