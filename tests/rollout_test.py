"""The two-turn episode vs no-cache recomputation, and its loss layout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import rollout
from score_jax import sampling
# Shared tiny model and no-cache references (pytest puts tests/ on sys.path).
from sampling_test import MODEL, P, PROMPTS, full_forward_log_probs, greedy_case, params
from sampling_test import reference_greedy

T1, T2 = 8, 6
INSTR = np.array([4, 19, 33], np.int32)


@functools.lru_cache
def episode(temperature):
  eos = greedy_case()[3]  # ends y1 rows at different steps, leaves some truncated
  two_turn = jax.jit(rollout.two_turn, static_argnames=('model', 'max_len_1', 'max_len_2',
                                                         'eos_id'))
  prompt_BxP, valid_BxP = rollout.left_pad(PROMPTS, P)
  return two_turn(MODEL, params(), prompt_BxP, valid_BxP, jnp.asarray(INSTR),
                  jax.random.key(7), sampling.SampleParams.create(temperature),
                  max_len_1=T1, max_len_2=T2, eos_id=eos), eos


def test_greedy_turns_match_no_cache_reference():
  ep, eos = episode(0.0)
  y1_tokens, y1_valid = np.asarray(ep.y1.tokens_BxT), np.asarray(ep.y1.valid_BxT)
  assert len(set(np.asarray(ep.y1.lengths_B))) >= 3 and np.asarray(ep.y1.truncated_B).any()
  for row, prompt in enumerate(PROMPTS):
    ref_1, logp_1 = reference_greedy(params(), prompt, T1, eos)
    np.testing.assert_array_equal(y1_tokens[row, :len(ref_1)], ref_1)
    # Turn 2 sees [prompt, y1 incl. EOS, instruction], no pads anywhere.
    context = prompt + list(y1_tokens[row][y1_valid[row]]) + list(INSTR)
    ref_2, logp_2 = reference_greedy(params(), context, T2, eos)
    n = len(ref_2)
    np.testing.assert_array_equal(ep.y2.tokens_BxT[row, :n], ref_2)
    np.testing.assert_allclose(ep.y2.logprobs_BxT[row, :n], logp_2, atol=1e-5)
    assert not np.asarray(ep.y2.valid_BxT)[row, n:].any()
    assert int(ep.y2.lengths_B[row]) == n
    assert bool(ep.y2.truncated_B[row]) == (eos not in ref_2)


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_episode_sequence_layout_and_logprob_consistency(temperature):
  ep, _ = episode(temperature)
  tokens, valid, turn = map(np.asarray, rollout.episode_sequence(ep, jnp.asarray(INSTR)))
  y1_valid, y2_valid = np.asarray(ep.y1.valid_BxT), np.asarray(ep.y2.valid_BxT)
  B, I = len(PROMPTS), len(INSTR)
  y1_at, instr_at, y2_at = slice(P, P + T1), slice(P + T1, P + T1 + I), slice(P + T1 + I, None)
  assert tokens.shape == valid.shape == turn.shape == (B, P + T1 + I + T2)

  want_turn = np.zeros_like(turn)
  want_turn[:, y1_at] = y1_valid
  want_turn[:, y2_at] = 2 * y2_valid
  np.testing.assert_array_equal(turn, want_turn)
  np.testing.assert_array_equal(tokens[:, instr_at], np.broadcast_to(INSTR, (B, I)))
  assert valid[:, instr_at].all()
  np.testing.assert_array_equal(valid[:, y2_at], y2_valid)

  # What the loss will compute: log-prob of slot t's token from the logits at slot t-1.
  logp_BxSxV = full_forward_log_probs(params(), tokens, valid)
  taken_BxS = np.zeros(tokens.shape, np.float32)
  taken_BxS[:, 1:] = np.take_along_axis(logp_BxSxV[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.where(turn == 1, taken_BxS, 0)[:, y1_at], ep.y1.logprobs_BxT,
                             atol=1e-5)
  np.testing.assert_allclose(np.where(turn == 2, taken_BxS, 0)[:, y2_at], ep.y2.logprobs_BxT,
                             atol=1e-5)


def test_left_pad():
  tokens, valid = rollout.left_pad([[5, 6, 7], [9]], 4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
  np.testing.assert_array_equal(valid, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match='prompt 1 has 5 tokens'):
    rollout.left_pad([[1], [1, 2, 3, 4, 5]], 4)
