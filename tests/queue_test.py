"""The refilling sampler (`sampling.generate_queue`): N episodes through fewer cache rows
give what `generate` gives on all N at once (itself proven against a no-cache
recomputation), and sampled episodes are consistent with a full forward of each episode."""
import functools

import jax
import numpy as np
import pytest

from score_jax import episodes
from score_jax import sampling
from episodes_test import INSTR, L
from sampling_test import MODEL, P, WINDOW_MODEL, full_forward_log_probs, params, pick_eos
from sampling_test import reference_greedy, sampler

# 13 ragged prompts (more than any slot count below, and not a multiple of it).
PROMPTS = [[2] + [(7 * i + 3 * j) % 44 + 4 for j in range(1 + i % 6)] for i in range(13)]


@functools.lru_cache
def eos_id(model=MODEL):
  no_eos = [reference_greedy(params(model=model), p, L, eos_id=-1, model=model)[0]
            for p in PROMPTS]
  return pick_eos(no_eos, L)  # ends first attempts at different steps, leaves some truncated


def queue(model, slots, turns, refill=0, spans=1):
  fn = jax.jit(functools.partial(
      sampling.generate_queue, model, slots=slots, turns=turns, max_len=L,
      stop_ids=sampling.stop_set(None, (eos_id(model),)), refill=refill, spans=spans))

  def run(params, temperature=0.0, seed=7):
    prompt, valid = episodes.left_pad(PROMPTS, P)
    return fn(params, prompt, valid, jax.random.key(seed),
              sampling.SampleParams.create(temperature), instr_I=INSTR)
  return run


def fields(samples):
  return {f: np.stack([np.asarray(getattr(s, f)) for s in samples])
          for f in ('tokens_BxT', 'valid_BxT', 'logprobs_BxT', 'lengths_B', 'truncated_B')}


@pytest.mark.parametrize('model,turns,slots,refill,spans', [
    (MODEL, 2, 4, 0, 1), (MODEL, 3, 5, 2, 4), (MODEL, 1, 3, 1, 1), (WINDOW_MODEL, 2, 4, 0, 3)])
def test_greedy_queue_equals_generate_on_all_rows(model, turns, slots, refill, spans):
  """Rows are reused (13 episodes, fewer slots), attempts end at different steps (eos or
  truncation), instructions are fed token by token: the tokens are generate's, exactly.
  With `spans` > 1 the queue attends over the live span of its busy rows' cache only,
  while generate (the reference) reads the whole cache."""
  p = params(model=model)
  prompt, valid = episodes.left_pad(PROMPTS, P)
  want = sampler(model, L, (eos_id(model),), turns)(p, prompt, valid, jax.random.key(7),
                                               instr_I=INSTR if turns > 1 else None)
  want = fields(want if turns > 1 else (want,))
  got = fields(queue(model, slots, turns, refill, spans)(p))
  for f in ('tokens_BxT', 'valid_BxT', 'lengths_B', 'truncated_B'):
    np.testing.assert_array_equal(got[f], want[f], err_msg=f)
  np.testing.assert_allclose(got['logprobs_BxT'], want['logprobs_BxT'], atol=3e-5)
  lengths = want['lengths_B'][0]
  assert len(set(lengths)) >= 3 and want['truncated_B'][0].any() and not want['truncated_B'][0].all()


@pytest.mark.parametrize('turns', [2, 3])
def test_sampled_episodes_match_a_full_forward(turns):
  """At temperature 1 the queue's draws differ from generate's, so check each episode on
  its own: its recorded log-probs are those of one plain forward over
  [prompt, y_1, instr, ..., y_T]. A row that kept a previous episode's keys, fed the
  instruction at the wrong slot, or read too short a live span (`spans` = turns), would
  fail this."""
  out = fields(queue(MODEL, 4, turns, spans=turns)(params(), temperature=1.0, seed=3))
  prompt, valid = episodes.left_pad(PROMPTS, P)
  b = episodes.Batch(problems=[None] * len(PROMPTS), prompt_BxP=prompt, prompt_valid_BxP=valid,
                     tokens_TxBxL=out['tokens_BxT'], valid_TxBxL=out['valid_BxT'],
                     truncated_TxB=out['truncated_B'],
                     onpolicy_BxT=np.ones((len(PROMPTS), turns), bool))
  layout = episodes.loss_layout(b, INSTR)
  tokens, turn = layout['tokens'], layout['turn']
  logp_BxSxV = full_forward_log_probs(params(), tokens, layout['valid'])
  taken_BxS = np.zeros(tokens.shape, np.float32)
  taken_BxS[:, 1:] = np.take_along_axis(logp_BxSxV[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  I = len(INSTR)
  for t in range(turns):
    s = P + t * (L + I)
    np.testing.assert_allclose(np.where(turn == t + 1, taken_BxS, 0)[:, s:s + L],
                               out['logprobs_BxT'][t], atol=3e-5)
  # Every episode ran every attempt; sampled lengths are ragged.
  assert (out['lengths_B'] > 0).all() and len(set(out['lengths_B'].ravel())) >= 3
  ends = np.take_along_axis(out['tokens_BxT'], out['lengths_B'][..., None] - 1, -1)[..., 0]
  np.testing.assert_array_equal(out['truncated_B'], ends != eos_id())
