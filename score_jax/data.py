"""From task text to token batches and back: prompts, instruction, SFT transcripts, rewards.

Host-side NumPy only; the compiled code sees fixed-shape arrays in the slot layout of
`rollout.episode_sequence` (README "Design").
"""
from typing import Sequence

import numpy as np

from score_jax import evaluate
from score_jax import rollout
from score_jax import sampling
from score_jax.tasks.base import Problem, Task
from score_jax.tasks.formats import PromptFormat
from score_jax.tokenizer import Tokenizer


def transcript_text(fmt: PromptFormat, task: Task, problem: Problem, y1: str, y2: str) -> str:
  """A whole two-turn episode as text (tokenizer corpus)."""
  return fmt.prompt_text(task, problem) + y1 + fmt.instruction_text(task) + y2


def encode_prompts(tok: Tokenizer, fmt: PromptFormat, task: Task,
                   problems: Sequence[Problem], max_len: int):
  """Left-padded [BOS, prompt] ids -> (tokens_BxP, valid_BxP); no BOS when the tokenizer
  has none to add (bos_id None: a chat template that writes it, or a model without one)."""
  bos = [] if tok.bos_id is None else [tok.bos_id]
  ids = [bos + tok.encode(fmt.prompt_text(task, p)) for p in problems]
  return rollout.left_pad(ids, max_len, pad_id=tok.pad_id)


def instruction_ids(tok: Tokenizer, fmt: PromptFormat, task: Task) -> np.ndarray:
  return np.asarray(tok.encode(fmt.instruction_text(task)), np.int32)


def _right_padded(seqs: Sequence[Sequence[int]], length: int, what: str) -> sampling.Sample:
  """Response token lists (EOS included) as a `Sample` with fixed length."""
  tokens = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"{what} of {len(s)} tokens exceeds its maximum length {length}; raise "
                       f"config.rollout.max_len_1/max_len_2")
    tokens[i, :len(s)] = s
  lengths = np.asarray([len(s) for s in seqs], np.int32)
  valid = np.arange(length)[None, :] < lengths[:, None]
  return sampling.Sample(tokens_BxT=tokens, valid_BxT=valid,
                         logprobs_BxT=np.zeros(tokens.shape, np.float32), lengths_B=lengths,
                         truncated_B=np.zeros(len(seqs), bool))


def sft_batch(tok: Tokenizer, fmt: PromptFormat, task: Task, rng: np.random.Generator, n: int,
              max_prompt_len: int, max_len_1: int, max_len_2: int) -> dict:
  """Base-model transcripts in the same slot layout as the RL episodes."""
  transcripts = task.base_transcripts(rng, n)
  prompt, prompt_valid = encode_prompts(tok, fmt, task, [t[0] for t in transcripts], max_prompt_len)
  y1 = _right_padded([tok.encode(t[1]) + [tok.eos_id] for t in transcripts], max_len_1, "y1")
  y2 = _right_padded([tok.encode(t[2]) + [tok.eos_id] for t in transcripts], max_len_2, "y2")
  episode = rollout.Episode(prompt_BxP=prompt, prompt_valid_BxP=prompt_valid, y1=y1, y2=y2)
  tokens, valid, turn = rollout.episode_sequence(episode, instruction_ids(tok, fmt, task))
  return dict(tokens=np.asarray(tokens), valid=np.asarray(valid), turn=np.asarray(turn))


def rl_problems(task: Task, seed: int, phase: int, step: int, num_prompts: int,
                samples_per_prompt: int) -> list[Problem]:
  """Training problems of one step, each repeated k times in a row (RLOO groups).

  Seeded by (seed, phase, step), so a resumed run sees exactly the problems it would
  have seen.
  """
  rng = np.random.default_rng([seed, phase, step])
  return [p for p in task.train_problems(rng, num_prompts) for _ in range(samples_per_prompt)]


def response_tokens(sample) -> list[list[int]]:
  """Valid tokens of each row of a Sample (EOS included), as Python lists."""
  tokens, valid = np.asarray(sample.tokens_BxT), np.asarray(sample.valid_BxT)
  return [row[v].tolist() for row, v in zip(tokens, valid)]


def score_episode(tok: Tokenizer, task: Task, problems: Sequence[Problem], episode) -> dict:
  """Rewards and self-correction statistics of a batch of two-turn episodes (host side)."""
  y1, y2 = response_tokens(episode.y1), response_tokens(episode.y2)
  text1 = [tok.decode(t) for t in y1]
  text2 = [tok.decode(t) for t in y2]
  # One call for both turns, so a parallel verifier sees the whole batch at once.
  r = task.rewards(text1 + text2, list(problems) * 2)
  r1, r2 = r[:len(text1)], r[len(text1):]
  trunc1, trunc2 = np.asarray(episode.y1.truncated_B), np.asarray(episode.y2.truncated_B)
  stats = evaluate.self_correction_metrics(r1, r2, y1, y2, trunc1, trunc2)
  return dict(r1=r1, r2=r2, text1=text1, text2=text2, tokens1=y1, tokens2=y2,
              truncated1=trunc1, truncated2=trunc2, stats=stats,
              len1=np.asarray(episode.y1.lengths_B), len2=np.asarray(episode.y2.lengths_B))
