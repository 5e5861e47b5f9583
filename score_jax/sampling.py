"""Prefill + `lax.while_loop` decode with a KV cache over the slot layout.

Every new token (prompt, instruction or sampled) is written at the next free slot with its
validity; rotary positions continue from the number of valid slots so far. Rows that have
finished keep writing pad tokens as *invalid* slots, so all rows share one slot counter.

A row finishes at the first token in its stop set: `eos_id` plus any `stop_ids` (e.g.
Gemma's `<end_of_turn>` for instruction-tuned chat). The set is static, so it is part of
the compiled loop and never retraces per call.

`generate` is the one generation path: a context, then one or more attempts in one cache
with an instruction between them (the SCoRe episode, offline repair, plain sampling).
`generate_queue` gives the same episodes through fewer cache rows than episodes, each
row with its own slot counter, refilled as its episode ends (ragged attempt lengths).

The cache is sized for the longest episode, but most decode steps have written only its
first part. With `spans` > 1 (`live_spans`) a step attends over the smallest of a few
static spans that holds every written slot, so the empty future costs no KV reads: on an
accelerator the cache's traffic, not the weights', dominates a decode step at long caches
and large batches. Each span is its own `while_loop` over the steps whose slots it holds,
one after the other; a `lax.switch` per step instead made XLA copy the whole cache into
and out of the branch every step.
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
  slot: jax.Array  # int32: next free slot, a scalar or each row's own (generate_queue)
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


def append(model, params, state: DecodeState, tokens_BxL, valid_BxL,
           live: Optional[int] = None) -> DecodeState:
  """Prefills L tokens at `state.slot`. The caller must size the cache: past its end
  `dynamic_update_slice` would clamp and overwrite earlier slots. With `live` (static),
  attention reads only the first `live` slots, which must hold every slot written so far
  and these L (the caller's promise: rows past it attend to nothing)."""
  B, L = tokens_BxL.shape
  W = live or state.valid_BxS.shape[1]  # the slots attended
  valid_BxS = model_lib.write_slots(state.valid_BxS, valid_BxL, state.slot, axis=1)
  # Positions continue the row's count of valid tokens; same as positions_from_valid over
  # the whole sequence, so cached and full-forward logits agree.
  positions_BxL = state.next_pos_B[:, None] + model_lib.positions_from_valid(valid_BxL)
  cum_BxL = jnp.cumsum(valid_BxL.astype(jnp.int32), axis=1)
  # Query at slot q sees valid slots <= q and itself (so pads never attend to nothing).
  query_slot_BxL = jnp.broadcast_to(state.slot, (B,))[:, None] + jnp.arange(L)
  key_slot_W = jnp.arange(W)
  causal_BxLxW = key_slot_W <= query_slot_BxL[..., None]
  self_BxLxW = key_slot_W == query_slot_BxL[..., None]
  mask_BxLxW = (causal_BxLxW & valid_BxS[:, None, :W]) | self_BxLxW
  hidden_BxLxD, cache = model.apply(params, tokens_BxL, positions_BxL, mask_BxLxW,
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


def live_spans(cache_size: int, spans: int) -> tuple[int, ...]:
  """`spans` static attention spans evenly up to `cache_size`, in multiples of 8."""
  step = -(-cache_size // max(spans, 1))
  step = -(-step // 8) * 8
  return tuple(sorted({min(cache_size, step * (i + 1)) for i in range(max(spans, 1))}))


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


def _draw(logits_BxV, rng, sample_params: SampleParams, never_id):
  """(token_B, its untempered log-prob_B): the one draw of both decode loops."""
  token_B = sample_token(logits_BxV, rng, sample_params, never_id)
  logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None],
                                  axis=-1)[:, 0]
  return token_B, logprob_B


class _Loop(NamedTuple):
  step: jax.Array
  done_B: jax.Array
  state: DecodeState
  rng: jax.Array
  tokens_BxT: jax.Array
  valid_BxT: jax.Array
  logprobs_BxT: jax.Array


def decode(model, params, state: DecodeState, rng, sample_params: SampleParams,
           max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0, spans: int = 1
           ) -> tuple[DecodeState, Sample]:
  """Samples up to T tokens per row, one slot per step, until every row emitted a stop
  token (`stop_ids`, static, see `stop_set`). Finished rows write `pad_id` as invalid
  slots; `pad_id` is never sampled unless it is also a stop token.

  The last sampled token is fed to the model too, so the cache holds the full answer (incl.
  the stop token) and `state.slot` ends right after the longest sample, ready for `append`.
  `spans`: see `live_spans`.
  """
  B = state.valid_BxS.shape[0]
  S = state.valid_BxS.shape[1]
  widths = live_spans(S, spans)
  T = max_new_tokens
  stop_ids = tuple(stop_ids)
  stop_K = jnp.asarray(stop_ids or (-1,), jnp.int32)  # -1: never sampled
  never_id = None if pad_id in stop_ids else pad_id

  def cond(loop: _Loop, end: int):
    return (loop.step < T) & ~jnp.all(loop.done_B) & (loop.state.slot < end)

  def body(loop: _Loop, width: int) -> _Loop:
    rng, step_rng = jax.random.split(loop.rng)
    live_B = ~loop.done_B
    token_B, logprob_B = _draw(loop.state.last_logits_BxV, step_rng, sample_params, never_id)
    token_B = jnp.where(live_B, token_B, pad_id)
    at = (0, loop.step)
    return _Loop(
        step=loop.step + 1,
        done_B=loop.done_B | jnp.isin(token_B, stop_K),
        state=append(model, params, loop.state, token_B[:, None], live_B[:, None], width),
        rng=rng,
        tokens_BxT=jax.lax.dynamic_update_slice(loop.tokens_BxT, token_B[:, None], at),
        valid_BxT=jax.lax.dynamic_update_slice(loop.valid_BxT, live_B[:, None], at),
        logprobs_BxT=jax.lax.dynamic_update_slice(
            loop.logprobs_BxT, jnp.where(live_B, logprob_B, 0.0)[:, None], at))

  loop = _Loop(
      step=jnp.int32(0), done_B=jnp.zeros((B,), bool), state=state, rng=rng,
      tokens_BxT=jnp.full((B, T), pad_id, jnp.int32), valid_BxT=jnp.zeros((B, T), bool),
      logprobs_BxT=jnp.zeros((B, T), jnp.float32))
  for w in widths:  # Slots only grow: a span whose end is behind the slot runs no step.
    loop = jax.lax.while_loop(lambda l, w=w: cond(l, w), lambda l, w=w: body(l, w), loop)
  return loop.state, Sample(
      tokens_BxT=loop.tokens_BxT, valid_BxT=loop.valid_BxT, logprobs_BxT=loop.logprobs_BxT,
      lengths_B=jnp.sum(loop.valid_BxT, axis=1, dtype=jnp.int32), truncated_B=~loop.done_B)


def generate(model, params, context_BxC, context_valid_BxC, rng, sample_params: SampleParams,
             *, turns: int, max_len: int, stop_ids: Sequence[int], pad_id: int = 0,
             instr_I=None, spans: int = 1) -> tuple[Sample, ...]:
  """context -> attempt 1 -> [instr -> attempt t] for t = 2..turns, in one KV cache.

  `context_BxC` is left-padded (or has gaps: only validity counts). Each attempt ends at
  a stop token or after `max_len` tokens; the instruction is written right after the
  longest attempt of the batch. Jittable with model, turns, max_len, stop_ids and pad_id
  static. The cache has exactly the slots this needs, so nothing is clamped. `spans`: the
  decode steps' attention spans (`live_spans`).
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
                           pad_id, spans)
    attempts.append(sample)
  return tuple(attempts)


class _Queue(NamedTuple):
  state: DecodeState  # B cache rows ("slots"), each at its own slot counter
  rng: jax.Array
  episode_B: jax.Array  # the episode a row works on; -1: free
  turn_B: jax.Array  # its attempt
  pos_B: jax.Array  # tokens sampled in that attempt so far
  instr_B: jax.Array  # next instruction token to feed; I once fed (then it samples)
  next_episode: jax.Array  # scalar: the first episode not yet started
  tokens_TxNxL: jax.Array
  valid_TxNxL: jax.Array
  logprobs_TxNxL: jax.Array
  truncated_TxN: jax.Array


def generate_queue(model, params, context_NxC, context_valid_NxC, rng,
                   sample_params: SampleParams, *, slots: int, turns: int, max_len: int,
                   stop_ids: Sequence[int], pad_id: int = 0, instr_I=None,
                   refill: int = 0, spans: int = 1) -> tuple[Sample, ...]:
  """`generate` for N episodes through a cache of `slots` rows: an episode's row takes the
  next episode as soon as it is done, instead of idling until the batch's longest
  episode ends. Same outputs as `generate` on all N rows (greedy: the same tokens; the
  cache of a row only ever holds its own episode), in episode order, so RLOO groups
  stay whole.

  Attempts are ragged: most stop early, a few run to `max_len`. `generate` decodes every
  row until its batch's longest attempt ends, so at a typical spread most of its decode
  steps write pads. Here each row has its own slot counter (`write_slots`); the
  instruction between attempts is fed one token per decode step to that row alone, and a
  free row waits until `refill` rows are free (default slots // 4), which are then
  prefilled together in a batch of `refill` rows: a prefill costs about as many FLOPs as
  `refill` rows decoding `context` tokens one by one would, so batching them keeps the
  prefill as cheap as `generate`'s, while the share of decode-step rows left idle stays
  below refill / slots. A decode step attends over the smallest of `spans` spans
  (`live_spans`) that holds the highest slot of its busy rows. Jittable with everything
  after `sample_params` static.
  """
  N, C = context_NxC.shape
  B = slots
  R = min(refill or max(B // 4, 1), B)
  I = 0 if instr_I is None else instr_I.shape[0]
  if turns > 1 and instr_I is None:
    raise ValueError('more than one attempt needs the instruction between them')
  instr_I = jnp.zeros((1,), jnp.int32) if instr_I is None else instr_I.astype(jnp.int32)
  S = C + turns * max_len + (turns - 1) * I
  widths = live_spans(S, spans)
  stop_ids = tuple(stop_ids)
  stop_K = jnp.asarray(stop_ids or (-1,), jnp.int32)
  never_id = None if pad_id in stop_ids else pad_id

  def take_episodes(q: _Queue) -> _Queue:
    """Prefills the next min(R, left) episodes into the first free rows."""
    free_B = q.episode_B < 0
    n = jnp.minimum(jnp.minimum(jnp.sum(free_B), R), N - q.next_episode)
    take_R = jnp.arange(R) < n
    rows_R = jnp.where(take_R, jnp.nonzero(free_B, size=R, fill_value=0)[0], B)  # B: dropped
    episodes_R = jnp.minimum(q.next_episode + jnp.arange(R), N - 1)
    new = start(model, params, context_NxC[episodes_R],
                context_valid_NxC[episodes_R] & take_R[:, None], cache_size=S)
    new = new.replace(slot=jnp.full((R,), new.slot, jnp.int32))
    state = jax.tree.map(lambda old, x: old.at[rows_R].set(x, mode='drop'), q.state, new)
    put = lambda a, v: a.at[rows_R].set(v, mode='drop')
    return q._replace(state=state, episode_B=put(q.episode_B, q.next_episode + jnp.arange(R)),
                      turn_B=put(q.turn_B, 0), pos_B=put(q.pos_B, 0), instr_B=put(q.instr_B, I),
                      next_episode=q.next_episode + n)

  def decode_step(q: _Queue, width: int) -> _Queue:
    """One token per busy row: the next instruction token, or a sampled one."""
    rng, step_rng = jax.random.split(q.rng)
    busy_B = q.episode_B >= 0
    feeding_B = q.instr_B < I
    sampling_B = busy_B & ~feeding_B
    token_B, logprob_B = _draw(q.state.last_logits_BxV, step_rng, sample_params, never_id)
    token_B = jnp.where(feeding_B, instr_I[jnp.minimum(q.instr_B, I - 1)], token_B)
    token_B = jnp.where(busy_B, token_B, pad_id)
    # Only sampled tokens are recorded; other rows index turn T, which is dropped.
    at = (jnp.where(sampling_B, q.turn_B, turns), q.episode_B, q.pos_B)
    stopped_B = sampling_B & jnp.isin(token_B, stop_K)
    ended_B = stopped_B | sampling_B & (q.pos_B + 1 == max_len)
    more_B = ended_B & (q.turn_B + 1 < turns)
    return q._replace(
        # Free rows write pads as invalid slots; their cache is replaced when refilled, so
        # they need not fit the span (their queries then see nothing, and are unused).
        state=append(model, params, q.state, token_B[:, None], busy_B[:, None], width),
        rng=rng,
        episode_B=jnp.where(ended_B & ~more_B, -1, q.episode_B),
        turn_B=q.turn_B + more_B,
        pos_B=jnp.where(more_B, 0, q.pos_B + sampling_B),
        instr_B=jnp.where(more_B, 0, q.instr_B + (busy_B & feeding_B)),
        tokens_TxNxL=q.tokens_TxNxL.at[at].set(token_B, mode='drop'),
        valid_TxNxL=q.valid_TxNxL.at[at].set(True, mode='drop'),
        logprobs_TxNxL=q.logprobs_TxNxL.at[at].set(logprob_B, mode='drop'),
        truncated_TxN=q.truncated_TxN.at[at[:2]].set(ended_B & ~stopped_B, mode='drop'))

  def step(q: _Queue, width: int) -> _Queue:
    left = N - q.next_episode
    free = jnp.sum(q.episode_B < 0)
    return jax.lax.cond((left > 0) & (free >= jnp.minimum(R, left)), take_episodes,
                        lambda q: decode_step(q, width), q)

  def cond(q: _Queue):
    return (q.next_episode < N) | jnp.any(q.episode_B >= 0)

  def top_slot(q: _Queue):  # the highest slot a busy row writes next (0 if none is busy)
    return jnp.max(jnp.where(q.episode_B >= 0, q.state.slot, 0))

  def spans_in_turn(q: _Queue) -> _Queue:
    """Each span's loop runs while the top slot lies in it. A refill can lower the top
    slot, so the spans are cycled until the queue is done; each cycle makes progress, as
    the top slot always lies in one span."""
    for lo, hi in zip((0,) + widths[:-1], widths):
      q = jax.lax.while_loop(
          lambda q, lo=lo, hi=hi: cond(q) & (lo <= top_slot(q)) & (top_slot(q) < hi),
          lambda q, hi=hi: step(q, hi), q)
    return q

  empty = _empty_state(model.config, B, S)
  q = _Queue(
      state=empty.replace(slot=jnp.zeros((B,), jnp.int32)), rng=rng,
      episode_B=jnp.full((B,), -1, jnp.int32), turn_B=jnp.zeros((B,), jnp.int32),
      pos_B=jnp.zeros((B,), jnp.int32), instr_B=jnp.full((B,), I, jnp.int32),
      next_episode=jnp.int32(0),
      tokens_TxNxL=jnp.full((turns, N, max_len), pad_id, jnp.int32),
      valid_TxNxL=jnp.zeros((turns, N, max_len), bool),
      logprobs_TxNxL=jnp.zeros((turns, N, max_len), jnp.float32),
      truncated_TxN=jnp.zeros((turns, N), bool))
  q = jax.lax.while_loop(cond, spans_in_turn, q)
  return tuple(Sample(tokens_BxT=q.tokens_TxNxL[t], valid_BxT=q.valid_TxNxL[t],
                      logprobs_BxT=q.logprobs_TxNxL[t],
                      lengths_B=jnp.sum(q.valid_TxNxL[t], axis=1, dtype=jnp.int32),
                      truncated_B=q.truncated_TxN[t]) for t in range(turns))
