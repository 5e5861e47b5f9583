"""Prefill + `lax.while_loop` decode with a KV cache over the slot layout.

Every new token (prompt, instruction or sampled) is written at the next free slot with its
validity; rotary positions continue from the number of valid slots so far. Rows that have
finished keep writing pad tokens as *invalid* slots, so all rows share one slot counter.

A row finishes at the first token in its stop set: `eos_id` plus any `stop_ids` (e.g.
Gemma's `<end_of_turn>` for instruction-tuned chat). The set is static, so it is part of
the compiled loop and never retraces per call.

`generate` is the one generation path: a context, then one or more attempts in one cache
with an instruction between them (the SCoRe episode, offline repair, plain sampling).
"""
from typing import NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import model as model_lib


class SampleParams(NamedTuple):
  """Traced scalars: changing them never recompiles (pass the same dtypes, see `create`)."""
  temperature: jax.Array  # 0 = greedy
  top_k: jax.Array  # 0 = off
  top_p: jax.Array  # 1.0 = off

  @classmethod
  def create(cls, temperature=0.0, top_k=0, top_p=1.0) -> 'SampleParams':
    # Host scalars: the caller puts them on device (explicitly, episodes.py).
    return cls(np.float32(temperature), np.int32(top_k), np.float32(top_p))


@flax.struct.dataclass
class DecodeState:
  cache: dict
  valid_BxS: jax.Array  # bool: slot holds a real token
  next_pos_B: jax.Array  # int32: rotary position of the next valid token
  slot: jax.Array  # int32 scalar: next free slot
  last_logits_BxV: jax.Array  # float32: logits after the last valid token


@flax.struct.dataclass
class Sample:
  tokens_BxT: jax.Array  # pad after EOS; EOS included
  valid_BxT: jax.Array
  logprobs_BxT: jax.Array  # untempered log-prob of the taken token; 0 where invalid
  lengths_B: jax.Array  # incl. EOS
  truncated_B: jax.Array  # no stop token within T


def stop_set(eos_id: Optional[int], stop_ids: Sequence[int] = ()) -> tuple[int, ...]:
  """The sorted, hashable set {eos_id} | stop_ids (a jit static argument)."""
  ids = set(int(i) for i in stop_ids)
  if eos_id is not None:
    ids.add(int(eos_id))
  return tuple(sorted(ids))


def _empty_state(config, batch_size: int, cache_size: int) -> DecodeState:
  return DecodeState(
      cache=model_lib.init_cache(config, batch_size, cache_size),
      valid_BxS=jnp.zeros((batch_size, cache_size), bool),
      next_pos_B=jnp.zeros((batch_size,), jnp.int32),
      slot=jnp.int32(0),
      last_logits_BxV=jnp.zeros((batch_size, config.vocab_size), jnp.float32))


def append(model, params, state: DecodeState, tokens_BxL, valid_BxL) -> DecodeState:
  """Prefills L tokens at `state.slot`. The caller must size the cache: past its end
  `dynamic_update_slice` would clamp and overwrite earlier slots."""
  B, L = tokens_BxL.shape
  S = state.valid_BxS.shape[1]
  valid_BxS = jax.lax.dynamic_update_slice(state.valid_BxS, valid_BxL, (0, state.slot))
  # Positions continue the row's count of valid tokens; same as positions_from_valid over
  # the whole sequence, so cached and full-forward logits agree.
  positions_BxL = state.next_pos_B[:, None] + model_lib.positions_from_valid(valid_BxL)
  cum_BxL = jnp.cumsum(valid_BxL.astype(jnp.int32), axis=1)
  # Query at slot q sees valid slots <= q and itself (so pads never attend to nothing).
  query_slot_L = state.slot + jnp.arange(L)
  key_slot_S = jnp.arange(S)
  causal_LxS = key_slot_S[None, :] <= query_slot_L[:, None]
  self_LxS = key_slot_S[None, :] == query_slot_L[:, None]
  mask_BxLxS = (causal_LxS[None] & valid_BxS[:, None, :]) | self_LxS[None]
  hidden_BxLxD, cache = model.apply(params, tokens_BxL, positions_BxL, mask_BxLxS,
                                    cache=state.cache, cache_slot=state.slot,
                                    return_hidden=True)
  # Only the last valid position's logits are needed; unembed just that one row.
  any_valid_B = cum_BxL[:, -1] > 0
  last_B = jnp.argmax(cum_BxL, axis=1)  # first index reaching the final count
  hidden_Bx1xD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)
  logits_BxV = model.apply(params, hidden_Bx1xD, method=model.logits)[:, 0]
  return DecodeState(
      cache=cache,
      valid_BxS=valid_BxS,
      next_pos_B=state.next_pos_B + cum_BxL[:, -1],
      slot=state.slot + L,
      last_logits_BxV=jnp.where(any_valid_B[:, None], logits_BxV, state.last_logits_BxV))


def start(model, params, tokens_BxP, valid_BxP, cache_size: int) -> DecodeState:
  """Prefill of left-padded prompts into a fresh cache of `cache_size` slots."""
  state = _empty_state(model.config, tokens_BxP.shape[0], cache_size)
  return append(model, params, state, tokens_BxP, valid_BxP)


def filter_logits(logits_BxV, top_k, top_p):
  """Masks tokens outside top-k and outside the top-p nucleus (after top-k).

  Thresholds are dynamic (traced k and p); the argmax is always kept. Ties at the
  threshold are all kept.
  """
  V = logits_BxV.shape[-1]
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  rank_V = jnp.arange(V)
  sorted_BxV = jnp.where(rank_V < k, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # Keep a token if the mass strictly before it is below p (the first one always).
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = (mass_before_BxV < top_p) & (rank_V < k) | (rank_V == 0)
  num_keep_B = jnp.sum(keep_BxV, axis=-1)
  threshold_B = jnp.take_along_axis(sorted_BxV, num_keep_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BxV >= threshold_B, logits_BxV, -jnp.inf)


def _first_above(cdf_BxK, u_B, weights_BxK) -> jax.Array:
  """Index of the first entry whose cumulative weight exceeds u; rounding that leaves u at
  the total falls back to the last entry of nonzero weight."""
  first_B = jnp.sum(cdf_BxK <= u_B[:, None], axis=-1, dtype=jnp.int32)
  K = weights_BxK.shape[-1]
  last_B = K - 1 - jnp.argmax(weights_BxK[:, ::-1] > 0, axis=-1).astype(jnp.int32)
  return jnp.minimum(first_B, last_B)


def inverse_cdf_sample(logits_BxV, rng, block: int = 256) -> jax.Array:
  """One draw per row from softmax(logits): the first token whose cumulative probability
  exceeds a uniform draw, found in two levels (the block, then the token within it), so
  the cumulative sums are over sqrt-sized pieces, not the whole vocabulary. Exact like
  `jax.random.categorical`, but it needs one random number per row instead of a Gumbel
  per vocabulary entry. At the 50-256k vocabularies of real models those random bits are
  a large part of a decode step on a CPU: for SmolLM2 (49,152) at batch 32, drawing the
  token took 54 ms with Gumbels and 17 ms with a one-level cumulative sum, of a ~170 ms
  step. Zero-probability (filtered) tokens add nothing and are never taken."""
  B, V = logits_BxV.shape
  n = -(-V // block)
  probs_BxNxK = jnp.pad(jax.nn.softmax(logits_BxV, axis=-1),
                        ((0, 0), (0, n * block - V))).reshape(B, n, block)
  mass_BxN = jnp.sum(probs_BxNxK, axis=-1)
  cdf_BxN = jnp.cumsum(mass_BxN, axis=-1)
  u_B = jax.random.uniform(rng, (B,)) * cdf_BxN[:, -1]
  blk_B = _first_above(cdf_BxN, u_B, mass_BxN)
  before_B = jnp.take_along_axis(cdf_BxN - mass_BxN, blk_B[:, None], axis=-1)[:, 0]
  probs_BxK = jnp.take_along_axis(probs_BxNxK, blk_B[:, None, None], axis=1)[:, 0]
  tok_B = _first_above(jnp.cumsum(probs_BxK, axis=-1), u_B - before_B, probs_BxK)
  return blk_B * block + tok_B


def sample_token(logits_BxV, rng, sample_params: SampleParams, never_id: Optional[int] = None):
  """Greedy when temperature <= 0, else temperature + top-k + top-p sampling.

  `never_id` (the tokenizer's dedicated pad piece) is never sampled: it is text that the
  model was never trained to write and that decoding drops.
  """
  if never_id is not None:
    logits_BxV = logits_BxV.at[:, never_id].set(model_lib.MASK_VALUE)
  def sample(_):
    scaled_BxV = logits_BxV / jnp.maximum(sample_params.temperature, 1e-6)
    # The vocabulary sort costs ~6x a plain draw: skip it when no filter is asked for.
    filtered_BxV = jax.lax.cond(
        (sample_params.top_k > 0) | (sample_params.top_p < 1.0),
        lambda x: filter_logits(x, sample_params.top_k, sample_params.top_p), lambda x: x,
        scaled_BxV)
    return inverse_cdf_sample(filtered_BxV, rng)

  def greedy(_):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  # A cond, not a where: greedy evaluation skips the vocabulary sort entirely.
  return jax.lax.cond(sample_params.temperature > 0, sample, greedy, None)


class _Loop(NamedTuple):
  step: jax.Array
  done_B: jax.Array
  state: DecodeState
  rng: jax.Array
  tokens_BxT: jax.Array
  valid_BxT: jax.Array
  logprobs_BxT: jax.Array


def decode(model, params, state: DecodeState, rng, sample_params: SampleParams,
           max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0
           ) -> tuple[DecodeState, Sample]:
  """Samples up to T tokens per row, one slot per step, until every row emitted a stop
  token (`stop_ids`, static, see `stop_set`). Finished rows write `pad_id` as invalid
  slots; `pad_id` is never sampled unless it is also a stop token.

  The last sampled token is fed to the model too, so the cache holds the full answer (incl.
  the stop token) and `state.slot` ends right after the longest sample, ready for `append`.
  """
  B = state.valid_BxS.shape[0]
  S = state.valid_BxS.shape[1]
  T = max_new_tokens
  stop_ids = tuple(stop_ids)
  stop_K = jnp.asarray(stop_ids or (-1,), jnp.int32)  # -1: never sampled
  never_id = None if pad_id in stop_ids else pad_id

  def cond(loop: _Loop):
    return (loop.step < T) & ~jnp.all(loop.done_B) & (loop.state.slot < S)

  def body(loop: _Loop) -> _Loop:
    rng, step_rng = jax.random.split(loop.rng)
    logits_BxV = loop.state.last_logits_BxV
    live_B = ~loop.done_B
    token_B = jnp.where(live_B, sample_token(logits_BxV, step_rng, sample_params, never_id),
                        pad_id)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1),
                                    token_B[:, None], axis=-1)[:, 0]
    at = (0, loop.step)
    return _Loop(
        step=loop.step + 1,
        done_B=loop.done_B | jnp.isin(token_B, stop_K),
        state=append(model, params, loop.state, token_B[:, None], live_B[:, None]),
        rng=rng,
        tokens_BxT=jax.lax.dynamic_update_slice(loop.tokens_BxT, token_B[:, None], at),
        valid_BxT=jax.lax.dynamic_update_slice(loop.valid_BxT, live_B[:, None], at),
        logprobs_BxT=jax.lax.dynamic_update_slice(
            loop.logprobs_BxT, jnp.where(live_B, logprob_B, 0.0)[:, None], at))

  loop = _Loop(
      step=jnp.int32(0), done_B=jnp.zeros((B,), bool), state=state, rng=rng,
      tokens_BxT=jnp.full((B, T), pad_id, jnp.int32), valid_BxT=jnp.zeros((B, T), bool),
      logprobs_BxT=jnp.zeros((B, T), jnp.float32))
  loop = jax.lax.while_loop(cond, body, loop)
  return loop.state, Sample(
      tokens_BxT=loop.tokens_BxT, valid_BxT=loop.valid_BxT, logprobs_BxT=loop.logprobs_BxT,
      lengths_B=jnp.sum(loop.valid_BxT, axis=1, dtype=jnp.int32), truncated_B=~loop.done_B)


def generate(model, params, context_BxC, context_valid_BxC, rng, sample_params: SampleParams,
             *, turns: int, max_len: int, stop_ids: Sequence[int], pad_id: int = 0,
             instr_I=None) -> tuple[Sample, ...]:
  """context -> attempt 1 -> [instr -> attempt t] for t = 2..turns, in one KV cache.

  `context_BxC` is left-padded (or has gaps: only validity counts). Each attempt ends at
  a stop token or after `max_len` tokens; the instruction is written right after the
  longest attempt of the batch. Jittable with model, turns, max_len, stop_ids and pad_id
  static. The cache has exactly the slots this needs, so nothing is clamped.
  """
  B, C = context_BxC.shape
  I = 0 if instr_I is None else instr_I.shape[0]
  if turns > 1 and instr_I is None:
    raise ValueError('more than one attempt needs the instruction between them')
  keys = [rng] if turns == 1 else list(jax.random.split(rng, turns))
  state = start(model, params, context_BxC, context_valid_BxC,
                cache_size=C + turns * max_len + (turns - 1) * I)
  attempts = []
  for t in range(turns):
    if t:
      instr_BxI = jnp.broadcast_to(instr_I, (B, I)).astype(context_BxC.dtype)
      state = append(model, params, state, instr_BxI, jnp.ones((B, I), bool))
    state, sample = decode(model, params, state, keys[t], sample_params, max_len, stop_ids,
                           pad_id)
    attempts.append(sample)
  return tuple(attempts)
