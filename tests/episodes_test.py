"""Episodes of N attempts vs no-cache recomputation, their loss layout, and offline first
attempts."""
import functools

import jax
import numpy as np
import pytest

from score_jax import episodes
# Shared tiny model and no-cache references (pytest puts tests/ on sys.path).
from sampling_test import MODEL, P, PROMPTS, full_forward_log_probs, params, pick_eos, sampler
from sampling_test import reference_greedy

L = 6  # tokens per attempt
INSTR = np.array([4, 19, 33], np.int32)


@functools.lru_cache
def eos_id():
  no_eos = [reference_greedy(params(), p, L, eos_id=-1)[0] for p in PROMPTS]
  return pick_eos(no_eos, L)  # ends attempt-1 rows at different steps, leaves some truncated


@functools.lru_cache
def batch(turns, temperature=0.0):
  prompt, valid = episodes.left_pad(PROMPTS, P)
  samples = sampler(MODEL, L, (eos_id(),), turns)(params(), prompt, valid, jax.random.key(7),
                                                  temperature, instr_I=INSTR)
  samples = samples if turns > 1 else (samples,)
  get = lambda f: np.stack([np.asarray(getattr(s, f)) for s in samples])
  return episodes.Batch(problems=[None] * len(PROMPTS), prompt_BxP=prompt,
                        prompt_valid_BxP=valid, tokens_TxBxL=get('tokens_BxT'),
                        valid_TxBxL=get('valid_BxT'), truncated_TxB=get('truncated_B'),
                        onpolicy_BxT=np.ones((len(PROMPTS), turns), bool)), samples


@pytest.mark.parametrize('turns', [2, 3])
def test_greedy_attempts_match_no_cache_reference(turns):
  """Attempt t sees [prompt, y_1, instr, ..., y_{t-1}, instr] with no pads anywhere."""
  b, samples = batch(turns)
  assert len(set(b.lengths_TxB()[0])) >= 3 and b.truncated_TxB[0].any()
  for row, prompt in enumerate(PROMPTS):
    context = list(prompt)
    for t, sample in enumerate(samples):
      ref, logp = reference_greedy(params(), context, L, eos_id())
      n = len(ref)
      np.testing.assert_array_equal(np.asarray(sample.tokens_BxT)[row, :n], ref)
      # float32 over a context of up to ~30 tokens: agreement to ~1e-5.
      np.testing.assert_allclose(np.asarray(sample.logprobs_BxT)[row, :n], logp, atol=3e-5)
      assert not np.asarray(sample.valid_BxT)[row, n:].any()
      assert bool(sample.truncated_B[row]) == (eos_id() not in ref)
      context += ref + list(INSTR)


@pytest.mark.parametrize('turns,temperature', [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)])
def test_loss_layout_and_logprob_consistency(turns, temperature):
  b, samples = batch(turns, temperature)
  out = episodes.loss_layout(b, INSTR)
  tokens, valid, turn = out['tokens'], out['valid'], out['turn']
  B, I = len(PROMPTS), len(INSTR)
  assert tokens.shape == valid.shape == turn.shape == (B, P + turns * L + (turns - 1) * I)
  starts = [P + t * (L + I) for t in range(turns)]
  want_turn = np.zeros_like(turn)
  for t, s in enumerate(starts):
    want_turn[:, s:s + L] = (t + 1) * b.valid_TxBxL[t]
    if t:
      np.testing.assert_array_equal(tokens[:, s - I:s], np.broadcast_to(INSTR, (B, I)))
      assert valid[:, s - I:s].all()
  np.testing.assert_array_equal(turn, want_turn)

  # What the loss will compute: log-prob of slot t's token from the logits at slot t-1.
  logp_BxSxV = full_forward_log_probs(params(), tokens, valid)
  taken_BxS = np.zeros(tokens.shape, np.float32)
  taken_BxS[:, 1:] = np.take_along_axis(logp_BxSxV[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  for t, (s, sample) in enumerate(zip(starts, samples)):
    np.testing.assert_allclose(np.where(turn == t + 1, taken_BxS, 0)[:, s:s + L],
                               sample.logprobs_BxT, atol=3e-5)


class _Tok:
  """Just what `Episodes.continue_chunks` needs."""
  pad_id, bos_id = 0, None

  def encode(self, text):
    return []


def test_continue_chunks_after_given_first_attempts_match_reference():
  """Offline first attempts: later attempts by the policy after [prompt, y_1, instr] laid out
  with the loss layout's gaps equal a fresh no-cache decode of the packed context."""
  first, _ = batch(1, 1.0)  # first attempts sampled at temperature 1 (not the policy's greedy)
  class Eps(episodes.Episodes):
    def __init__(self):
      self.max_len, self.instr_I, self.pad_id = L, INSTR, 0
      self.stop_ids = (eos_id(),)
      self._fn = sampler(MODEL, L, (eos_id(),), 2)

    def _attempt_chunks(self, params_, context, valid, rng, sample_params, turns, batch_size):
      assert turns == 2
      s = self._fn(params_, context, valid, rng, instr_I=INSTR)
      yield slice(None), [np.stack([np.asarray(getattr(x, f)) for x in s])
                          for f in ('tokens_BxT', 'valid_BxT', 'truncated_B')]
  out = episodes.concatenate(list(Eps().continue_chunks(params(), first, jax.random.key(3), None,
                                                        turns=3)))
  assert out.turns == 3
  np.testing.assert_array_equal(out.onpolicy_BxT, np.tile([False, True, True], (len(PROMPTS), 1)))
  np.testing.assert_array_equal(out.tokens_TxBxL[0], first.tokens_TxBxL[0])
  for row, prompt in enumerate(PROMPTS):
    context = list(prompt) + out.attempt_tokens(0)[row] + list(INSTR)
    for t in (1, 2):
      ref, _ = reference_greedy(params(), context, L, eos_id())
      assert out.attempt_tokens(t)[row] == ref
      context += ref + list(INSTR)


def test_concatenate_keeps_order_and_fields():
  a, _ = batch(2)
  b = episodes.concatenate([a, a])
  assert b.tokens_TxBxL.shape == (2, 2 * len(PROMPTS), L) and len(b.problems) == 2 * len(PROMPTS)
  np.testing.assert_array_equal(b.tokens_TxBxL[:, len(PROMPTS):], a.tokens_TxBxL)
  np.testing.assert_array_equal(b.onpolicy_BxT, np.ones((2 * len(PROMPTS), 2), bool))


def test_left_and_right_pad():
  tokens, valid = episodes.left_pad([[5, 6, 7], [9]], 4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
  np.testing.assert_array_equal(valid, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match='prompt 1 has 5 tokens'):
    episodes.left_pad([[1], [1, 2, 3, 4, 5]], 4)
  tokens, valid = episodes.right_pad([[5, 6], [7]], 3, pad_id=9)
  np.testing.assert_array_equal(tokens, [[5, 6, 9], [7, 9, 9]])
  np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match='raise config.rollout.max_len'):
    episodes.right_pad([[1, 2, 3, 4]], 3)


class _ChunkTask:
  """A verifier that records how many sampler calls had been dispatched at each call."""
  correction_instruction = 'again'

  def __init__(self, dispatched):
    self.dispatched, self.seen = dispatched, []

  def prompt(self, problem):
    return problem

  def rewards(self, texts, problems):
    self.seen.append(self.dispatched[0])
    return [float(len(t) % 3 == 0) for t in texts]


def _chunk_episodes():
  from score_jax import sharding
  from score_jax.tasks import formats

  class Tok:
    pad_id, bos_id, eos_id = 0, 2, eos_id()
    encode = staticmethod(lambda text: [4 + ord(c) % 40 for c in text])
    decode = staticmethod(lambda ids: ' '.join(map(str, ids)))

  class Rollout:
    max_prompt_len, max_len, slots, live_spans = P, L, 0, 1
  dispatched = [0]
  repl = sharding.replicated(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)))
  eps = episodes.Episodes(MODEL, (repl, repl, repl), Tok(), _ChunkTask(dispatched),
                          formats.PromptFormat(turn2='{instruction}'), Rollout())
  generate = eps._generate

  def counting(turns):
    fn = generate(turns)
    def call(*args):
      dispatched[0] += 1
      return fn(*args)
    return call
  eps._generate = counting
  return eps


def test_chunks_are_scored_as_they_arrive_and_equal_one_call():
  """With `batch_size` a third of the batch, every sampler call is dispatched before the
  verifier sees the first chunk (so the verifier runs while the device samples), the
  verifier is called once per chunk, and greedy attempts and rewards equal one call over
  the whole batch."""
  from score_jax import sampling
  eps = _chunk_episodes()
  problems = ['ab', 'cde', 'f', 'ghij', 'kl', 'mno', 'p', 'qrstu', 'vw', 'xyz', 'a', 'bcd']
  greedy = sampling.SampleParams.create(0.0)
  times = {}
  policy = params()['params']
  chunked = eps.score_chunks(eps.sample_chunks(policy, problems, jax.random.key(0), greedy,
                                               2, batch_size=4), times)
  assert eps.task.seen == [3, 3, 3] and set(times) == {'sample_time', 'score_time'}
  whole = eps.score(eps.sample(policy, problems, jax.random.key(1), greedy, 2))
  assert eps.task.seen[-1] == 4
  assert len(set(whole.lengths_TxB()[0])) >= 2 and len(set(whole.rewards_BxT[:, 1])) == 2
  assert chunked.problems == problems
  for name in ('prompt_BxP', 'tokens_TxBxL', 'valid_TxBxL', 'truncated_TxB', 'rewards_BxT'):
    np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
  assert chunked.texts == whole.texts
