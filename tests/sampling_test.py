"""KV-cached sampler vs a no-cache recomputation, and the sampling filters."""
import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import model as model_lib
from score_jax import sampling
from score_jax.episodes import left_pad

CONFIG = model_lib.ModelConfig(vocab_size=48, embed_dim=32, hidden_dim=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8)
MODEL = model_lib.Transformer(CONFIG)
PROMPTS = [[2, 17, 5, 9, 30], [2, 40], [2, 11, 12, 13, 14, 15, 21], [2, 8, 8]]
P, T = 8, 8


# Gemma 2/3 switches, with a sliding window much shorter than prompt + answer.
WINDOW_MODEL = model_lib.Transformer(model_lib.ModelConfig(
    vocab_size=48, embed_dim=32, hidden_dim=64, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=8, local_global_pattern=3, sliding_window_size=3, attn_logits_soft_cap=5.0,
    final_logit_soft_cap=8.0, use_post_attn_norm=True, use_post_ffw_norm=True,
    use_qk_norm=True, rope_base=1_000_000, rope_scale_factor=8.0))


@functools.lru_cache
def params(seed=0, model=MODEL):
  """Random params with block weights scaled up: at the default init a tiny model with tied
  embeddings mostly copies its last input token, which would make every test trivial."""
  tokens = jnp.ones((1, 4), jnp.int32)
  valid = jnp.ones((1, 4), bool)
  init = jax.jit(model.init)(jax.random.key(seed), tokens,
                             model_lib.positions_from_valid(valid),
                             model_lib.causal_attention_mask(valid))
  return jax.tree.map_with_path(
      lambda path, x: x if 'embedder' in jax.tree_util.keystr(path) else 3 * x, init)


def sampler(model, max_len, stops=(), turns=1, spans=1):
  """`sampling.generate` jitted once: (params, tokens, valid, rng, temperature, top_k, top_p,
  instr) -> the attempts (one Sample each; a single Sample when turns == 1)."""
  fn = jax.jit(functools.partial(sampling.generate, model, turns=turns, max_len=max_len,
                                 stop_ids=sampling.stop_set(None, stops), spans=spans))

  def run(params, tokens_BxP, valid_BxP, rng, temperature=0.0, top_k=0, top_p=1.0,
          instr_I=None):
    out = fn(params, tokens_BxP, valid_BxP, rng,
             sampling.SampleParams.create(temperature, top_k, top_p), instr_I=instr_I)
    return out[0] if turns == 1 else out
  run.jitted = fn
  return run


REF_WIDTH = 40  # fixed buffer for the reference: one compile for every prefix length


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model, params, tokens_1xW):
  """Plain causal forward, all slots valid, positions 0..W-1. Tokens after the prefix are
  filler and, being later, cannot change the prefix's logits (causality is model-tested)."""
  W = tokens_1xW.shape[1]
  logits, _ = model.apply(params, tokens_1xW, jnp.arange(W)[None],
                          model_lib.causal_attention_mask(jnp.ones((1, W), bool)))
  return jax.nn.log_softmax(logits[0], axis=-1)


def reference_greedy(params, context, max_new_tokens, eos_id, model=MODEL):
  """Greedy decoding without a cache: a full forward over the growing prefix each step.
  `eos_id` may be a set of stop ids."""
  stops = set(eos_id) if isinstance(eos_id, (set, tuple, list)) else {eos_id}
  seq, tokens, logprobs = list(context), [], []
  for _ in range(max_new_tokens):
    buf = np.zeros((1, REF_WIDTH), np.int32)
    buf[0, :len(seq)] = seq
    logp_V = np.asarray(_log_probs(model, params, jnp.asarray(buf))[len(seq) - 1])
    token = int(np.argmax(logp_V[1:])) + 1  # The sampler never emits pad (id 0).
    seq.append(token)
    tokens.append(token)
    logprobs.append(float(logp_V[token]))
    if token in stops:
      break
  return tokens, logprobs


def pick_eos(sequences, max_new_tokens):
  """A token that ends rows at different steps and leaves at least one row truncated."""
  for eos in range(4, CONFIG.vocab_size):
    first = [s.index(eos) if eos in s else max_new_tokens for s in sequences]
    if len(set(first)) >= 3 and max(first) == max_new_tokens:
      return eos
  raise AssertionError('no token gives ragged stops; change the seed')


def as_padded(rows, width, fill):
  out = np.full((len(rows), width), fill, np.asarray(rows[0] if rows[0] else [0.]).dtype)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


@functools.lru_cache
def greedy_case():
  """(sampler sample, reference tokens, reference logprobs, eos) on the ragged batch."""
  no_eos = [reference_greedy(params(), p, T, eos_id=-1)[0] for p in PROMPTS]
  eos = pick_eos(no_eos, T)
  refs = [reference_greedy(params(), p, T, eos) for p in PROMPTS]
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  sample = sampler(MODEL, T, (eos,))(params(), tokens_BxP, valid_BxP, jax.random.key(0))
  return sample, [r[0] for r in refs], [r[1] for r in refs], eos


def test_greedy_matches_no_cache_reference():
  sample, ref_tokens, ref_logprobs, eos = greedy_case()
  np.testing.assert_array_equal(sample.tokens_BxT, as_padded(ref_tokens, T, 0))
  np.testing.assert_allclose(sample.logprobs_BxT, as_padded(ref_logprobs, T, 0.0), atol=1e-5)
  lengths = [len(r) for r in ref_tokens]
  np.testing.assert_array_equal(sample.lengths_B, lengths)
  np.testing.assert_array_equal(sample.valid_BxT, np.arange(T) < np.array(lengths)[:, None])
  np.testing.assert_array_equal(sample.truncated_B, [eos not in r for r in ref_tokens])
  assert len(set(lengths)) >= 3 and any(sample.truncated_B)


def test_sliding_window_cached_decode_matches_no_cache():
  """Window 3 over left-padded prompts + 8 answer tokens: the cache must window by rotary
  position (pads excluded), exactly as the full forward does."""
  p = params(model=WINDOW_MODEL)
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  sample = sampler(WINDOW_MODEL, T)(p, tokens_BxP, valid_BxP, jax.random.key(0))
  refs = [reference_greedy(p, prompt, T, None, model=WINDOW_MODEL) for prompt in PROMPTS]
  np.testing.assert_array_equal(sample.tokens_BxT, [r[0] for r in refs])
  np.testing.assert_allclose(sample.logprobs_BxT, [r[1] for r in refs], atol=1e-5)
  # The window matters here: without it the same params decode differently.
  no_window = model_lib.Transformer(dataclasses.replace(WINDOW_MODEL.config,
                                                        local_global_pattern=0))
  unwindowed = [reference_greedy(p, prompt, T, None, model=no_window)[1] for prompt in PROMPTS]
  assert np.abs(np.array(unwindowed) - np.asarray(sample.logprobs_BxT)).max() > 1e-3


def test_live_spans_are_static_multiples_of_8_up_to_the_cache():
  assert sampling.live_spans(100, 4) == (32, 64, 96, 100)  # ceil(100 / 4) = 25 -> 32
  assert sampling.live_spans(100, 1) == (100,)
  assert sampling.live_spans(20, 8) == (8, 16, 20)  # spans narrower than 8 merge


def _attention_widths(jaxpr) -> set[int]:
  """The key widths S of every query-key product in the program: the einsum
  'BLKGH,BKSH' lowers to a dot_general batched over (B, K) whose output is [B, K, S, L, G]."""
  widths = set()
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == 'dot_general' and eqn.outvars[0].aval.ndim == 5
        and eqn.params['dimension_numbers'][1] == ((0, 1), (0, 2))):
      widths.add(eqn.outvars[0].aval.shape[2])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      widths |= _attention_widths(sub)
  return widths


def test_live_span_decode_matches_no_cache():
  """Two attempts, each decode step attending over the smallest of 4 spans of the 2 * 8 +
  8 + 3-slot cache that holds its slot: the tokens and log-probs of the no-cache
  recomputation (Gemma 2/3 layers: global, and local with a sliding window)."""
  model = WINDOW_MODEL
  p, instr = params(model=model), np.array([3, 4, 5], np.int32)
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  run = sampler(model, T, turns=2, spans=4)
  first, second = run(p, tokens_BxP, valid_BxP, jax.random.key(0), instr_I=instr)
  # The program attends over 4 widths of the 27-slot cache (the prefill over all 27).
  assert sampling.live_spans(P + 2 * T + 3, 4) == (8, 16, 24, 27)
  jaxpr = jax.make_jaxpr(run.jitted)(p, tokens_BxP, valid_BxP, jax.random.key(0),
                                     sampling.SampleParams.create(), instr_I=instr)
  assert _attention_widths(jaxpr.jaxpr) == {8, 16, 24, 27}
  for i, prompt in enumerate(PROMPTS):
    tokens1, logp1 = reference_greedy(p, prompt, T, None, model=model)
    np.testing.assert_array_equal(first.tokens_BxT[i], tokens1)
    tokens2, logp2 = reference_greedy(p, prompt + tokens1 + list(instr), T, None, model=model)
    np.testing.assert_array_equal(second.tokens_BxT[i], tokens2)
    np.testing.assert_allclose(first.logprobs_BxT[i], logp1, atol=1e-5)
    np.testing.assert_allclose(second.logprobs_BxT[i], logp2, atol=1e-5)


def test_a_span_too_short_changes_the_logits():
  """The span is what attention reads: one that misses written slots gives other logits
  (so the test above would fail if a step picked too short a span)."""
  p = params()
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  state = jax.jit(sampling.start, static_argnums=(0, 4))(MODEL, p, tokens_BxP, valid_BxP, 16)
  nxt = jnp.full((len(PROMPTS), 1), 7, jnp.int32)
  ones = jnp.ones((len(PROMPTS), 1), bool)
  append = jax.jit(sampling.append, static_argnums=0, static_argnames='live')
  whole = append(MODEL, p, state, nxt, ones).last_logits_BxV
  np.testing.assert_allclose(append(MODEL, p, state, nxt, ones, live=9).last_logits_BxV,
                             whole, atol=1e-5)
  short = append(MODEL, p, state, nxt, ones, live=4).last_logits_BxV
  assert np.abs(np.asarray(short) - np.asarray(whole)).max() > 1e-2


def test_stop_ids_end_rows_at_any_of_the_set():
  """eos_id plus extra stop ids (e.g. <end_of_turn>): each row ends at the first of them."""
  no_eos = [reference_greedy(params(), p, T, eos_id=-1)[0] for p in PROMPTS]
  firsts = sorted({(r.index(t), t) for r in no_eos for t in r[:T - 1]})
  stops = (firsts[0][1], firsts[-1][1])  # one stops a row early, one late
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  sample = sampler(MODEL, T, stops)(params(), tokens_BxP, valid_BxP, jax.random.key(0))
  refs = [reference_greedy(params(), p, T, set(stops))[0] for p in PROMPTS]
  assert {r[-1] for r in refs} >= set(stops)  # rows did end at each of the two
  np.testing.assert_array_equal(sample.tokens_BxT, as_padded(refs, T, 0))
  np.testing.assert_array_equal(sample.lengths_B, [len(r) for r in refs])
  np.testing.assert_array_equal(sample.truncated_B, [r[-1] not in stops for r in refs])
  assert sampling.stop_set(3, (7, 3, 1)) == (1, 3, 7)
  assert sampling.stop_set(None) == ()


def test_eos_makes_later_tokens_pad_and_invalid():
  sample, _, _, eos = greedy_case()
  tokens, valid = np.asarray(sample.tokens_BxT), np.asarray(sample.valid_BxT)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(tokens[row] == eos)
    if hits.size:
      end = hits[0] + 1
      assert valid[row, :end].all() and not valid[row, end:].any()
      assert (tokens[row, end:] == 0).all()
      assert (np.asarray(sample.logprobs_BxT)[row, end:] == 0).all()


def _run(sampler, temperature=0.0, top_k=0, top_p=1.0, seed=1, prompts=PROMPTS):
  tokens_BxP, valid_BxP = left_pad(prompts, P)
  return sampler(params(), tokens_BxP, valid_BxP, jax.random.key(seed),
                 temperature=temperature, top_k=top_k, top_p=top_p)


@functools.lru_cache
def sampler_no_eos():
  return sampler(MODEL, T, (-1,))


def test_settings_are_traced_and_reproducible():
  sampler = sampler_no_eos()
  greedy = _run(sampler).tokens_BxT
  a = _run(sampler, temperature=1.0, seed=5).tokens_BxT
  np.testing.assert_array_equal(a, _run(sampler, temperature=1.0, seed=5).tokens_BxT)
  assert not np.array_equal(a, _run(sampler, temperature=1.0, seed=6).tokens_BxT)
  # top_k=1 and a tiny nucleus both leave only the argmax.
  np.testing.assert_array_equal(_run(sampler, temperature=1.5, top_k=1).tokens_BxT, greedy)
  np.testing.assert_array_equal(_run(sampler, temperature=1.5, top_p=1e-6).tokens_BxT, greedy)
  _run(sampler, temperature=0.7, top_k=5, top_p=0.9)
  assert sampler.jitted._cache_size() == 1


def full_forward_log_probs(params, tokens_BxS, valid_BxS):
  """log_softmax of the logits at each slot, from one plain forward over the padded batch."""
  return np.asarray(_full_forward_log_probs(params, tokens_BxS, valid_BxS))


@jax.jit
def _full_forward_log_probs(params, tokens_BxS, valid_BxS):
  logits, _ = MODEL.apply(params, tokens_BxS, model_lib.positions_from_valid(valid_BxS),
                          model_lib.causal_attention_mask(valid_BxS))
  return jax.nn.log_softmax(logits, axis=-1)


def test_top_k_samples_stay_in_model_top_k():
  k = 3
  prompts = [[2, 5 + i, 7 * i % 40 + 4] for i in range(16)]
  sampler = sampler_no_eos()
  for seed in range(3):
    sample = _run(sampler, temperature=3.0, top_k=k, seed=seed, prompts=prompts)
    tokens_BxP, valid_BxP = left_pad(prompts, P)
    seq = np.concatenate([tokens_BxP, sample.tokens_BxT], 1)
    valid = np.concatenate([valid_BxP, sample.valid_BxT], 1)
    logp_BxSxV = full_forward_log_probs(params(), seq, valid)[:, P - 1:-1]  # predicts each sample
    taken = np.take_along_axis(logp_BxSxV, np.asarray(sample.tokens_BxT)[..., None], -1)
    rank_BxT = (logp_BxSxV[..., 1:] > taken).sum(-1)  # Among non-pad ids: pad is never sampled.
    assert (rank_BxT < k).all()
    # The untempered log-prob of the taken token is reported.
    np.testing.assert_allclose(
        sample.logprobs_BxT,
        np.take_along_axis(logp_BxSxV, np.asarray(sample.tokens_BxT)[..., None], -1)[..., 0],
        atol=1e-5)
  assert (rank_BxT > 0).any()  # temperature 3 does leave the argmax sometimes


@pytest.mark.parametrize('top_k,top_p', [(4, 1.0), (0, 0.6), (6, 0.5)])
def test_filter_keeps_exactly_top_k_and_nucleus(top_k, top_p):
  logits_BxV = jax.random.normal(jax.random.key(0), (64, 20)) * 2
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits_BxV, top_k, top_p)))
  logits = np.asarray(logits_BxV, np.float64)
  for row, keep in zip(logits, kept):
    np.testing.assert_array_equal(keep, filtered_probs(row, top_k, top_p) > 0)


def filtered_probs(logits_V, top_k, top_p, temperature=1.0):
  """The reference in float64: softmax(logits / temperature) kept to the top-k, then to the
  smallest prefix whose mass reaches top_p (the first token always), renormalised.
  -inf logits are never kept."""
  order = np.argsort(-logits_V)
  probs = np.exp((logits_V - logits_V.max()) / temperature)
  k = min(top_k or len(logits_V), int(np.isfinite(logits_V).sum()))
  sorted_probs = probs[order[:k]] / probs[order[:k]].sum()
  n = max(1, int(np.sum(np.cumsum(sorted_probs) - sorted_probs < top_p)))
  out = np.zeros_like(probs)
  out[order[:n]] = probs[order[:n]]
  return out / out.sum()


def test_cache_overflow_stops_decoding_and_truncates():
  tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
  state = sampling.start(MODEL, params(), tokens_BxP, valid_BxP, cache_size=P + 3)
  _, sample = sampling.decode(MODEL, params(), state, jax.random.key(1),
                              sampling.SampleParams.create(), T, (-1,))
  np.testing.assert_array_equal(sample.lengths_B, [3] * len(PROMPTS))
  assert np.asarray(sample.truncated_B).all()


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.7, 3, 1.0),
                                                     (1.3, 0, 0.8)])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
  """40,000 draws from one row of logits against the exact distribution, computed here in
  float64: every token within 5 binomial standard deviations, filtered tokens never."""
  V, N = 12, 40_000
  logits_V = np.asarray(jax.random.normal(jax.random.key(3), (V,)) * 2, np.float64)
  logits_V[4] = -60.0  # a token of ~0 probability stays ~never drawn
  sp = sampling.SampleParams.create(temperature, top_k, top_p)
  logits_NxV = jnp.asarray(np.broadcast_to(logits_V, (N, V)), jnp.float32)
  tokens = np.asarray(jax.jit(sampling.sample_token, static_argnums=3)(
      logits_NxV, jax.random.key(11), sp, 0))
  probs = filtered_probs(np.where(np.arange(V) == 0, -np.inf, logits_V),  # never_id 0
                         top_k, top_p, temperature)
  freq = np.bincount(tokens, minlength=V) / N
  assert (freq[probs == 0] == 0).all()
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / N) + 1e-9)


@pytest.mark.parametrize('block', [1, 4, 5, 64])
def test_two_level_draw_matches_softmax_across_blocks(block):
  """The block-then-token draw over 3 blocks, a padded last block, and blocks whose whole
  mass is zero (filtered tokens): frequencies of 40,000 draws within 5 standard deviations."""
  V, N = 12, 40_000
  logits_V = np.asarray(jax.random.normal(jax.random.key(5), (V,)), np.float64)
  logits_V[[4, 5, 6, 7, 11]] = -np.inf  # the whole second block at block=4, the last token
  tokens = np.asarray(jax.jit(sampling.inverse_cdf_sample, static_argnums=2)(
      jnp.asarray(np.broadcast_to(logits_V, (N, V)), jnp.float32), jax.random.key(2), block))
  probs = np.exp(logits_V - logits_V.max())
  probs /= probs.sum()
  freq = np.bincount(tokens, minlength=V) / N
  assert len(freq) == V and (freq[probs == 0] == 0).all()
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / N) + 1e-9)
