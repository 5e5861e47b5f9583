"""The SCoRe episode: attempt y1 on the prompt, then y2 after the correction instruction.

Sampling writes turn 2 into the same KV cache (instruction right after the longest y1);
`episode_sequence` lays the same tokens out in a fixed buffer for the loss. Both give the
same logits because the model only sees valid tokens and their positions (README "Design").
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import sampling


@flax.struct.dataclass
class Episode:
  prompt_BxP: jax.Array
  prompt_valid_BxP: jax.Array
  y1: sampling.Sample
  y2: sampling.Sample


def left_pad(token_lists, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to `length` -> (tokens_BxP int32, valid_BxP bool)."""
  tokens_BxP = np.full((len(token_lists), length), pad_id, np.int32)
  valid_BxP = np.zeros((len(token_lists), length), bool)
  for i, tokens in enumerate(token_lists):
    if len(tokens) > length:
      raise ValueError(f'prompt {i} has {len(tokens)} tokens, longer than the prompt '
                       f'length {length}; raise the max prompt length or shorten it')
    if not tokens:
      # The first sampled token would be conditioned on nothing.
      raise ValueError(f'prompt {i} is empty')
    tokens_BxP[i, length - len(tokens):] = tokens
    valid_BxP[i, length - len(tokens):] = True
  return tokens_BxP, valid_BxP


def two_turn(model, params, prompt_BxP, prompt_valid_BxP, instr_I, rng,
             sample_params: sampling.SampleParams, max_len_1: int, max_len_2: int,
             eos_id: int | None, stop_ids: tuple[int, ...] = ()) -> Episode:
  """start(prompt) -> decode y1 -> append(instr) -> decode y2, in one cache.

  Each turn ends at `eos_id` or any of `stop_ids` (e.g. `<end_of_turn>` for chat models).
  Jittable with model, max_len_1, max_len_2, eos_id and stop_ids (a tuple) static.
  """
  B, P = prompt_BxP.shape
  I = instr_I.shape[0]
  rng_1, rng_2 = jax.random.split(rng)
  state = sampling.start(model, params, prompt_BxP, prompt_valid_BxP,
                         cache_size=P + max_len_1 + I + max_len_2)
  state, y1 = sampling.decode(model, params, state, rng_1, sample_params, max_len_1, eos_id,
                              stop_ids)
  instr_BxI = jnp.broadcast_to(instr_I, (B, I))
  state = sampling.append(model, params, state, instr_BxI, jnp.ones((B, I), bool))
  _, y2 = sampling.decode(model, params, state, rng_2, sample_params, max_len_2, eos_id,
                          stop_ids)
  return Episode(prompt_BxP=prompt_BxP, prompt_valid_BxP=prompt_valid_BxP, y1=y1, y2=y2)


def episode_sequence(episode: Episode, instr_I) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fixed layout [prompt | y1 buffer | instr | y2 buffer] -> (tokens, valid, turn), [B,S].

  `turn_BxS` is 1 on valid y1 tokens, 2 on valid y2 tokens (EOS included), 0 elsewhere:
  the only tokens that enter the loss.
  """
  B = episode.prompt_BxP.shape[0]
  I = instr_I.shape[0]
  y1, y2 = episode.y1, episode.y2
  tokens_BxS = jnp.concatenate([
      episode.prompt_BxP, y1.tokens_BxT,
      jnp.broadcast_to(instr_I, (B, I)).astype(episode.prompt_BxP.dtype), y2.tokens_BxT], 1)
  valid_BxS = jnp.concatenate(
      [episode.prompt_valid_BxP, y1.valid_BxT, jnp.ones((B, I), bool), y2.valid_BxT], 1)
  zeros = lambda x: jnp.zeros(x.shape, jnp.int32)
  turn_BxS = jnp.concatenate([
      zeros(episode.prompt_BxP), y1.valid_BxT.astype(jnp.int32), jnp.zeros((B, I), jnp.int32),
      2 * y2.valid_BxT.astype(jnp.int32)], 1)
  return tokens_BxS, valid_BxS, turn_BxS
