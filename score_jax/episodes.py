"""The SCoRe episode, in one place: prompts -> T attempts in one KV cache -> rewards ->
the fixed layout the loss reads.

  x_1 = [BOS, prompt(problem)]            y_1 ~ pi(. | x_1)
  x_t = [x_{t-1}, y_{t-1}, instruction]   y_t ~ pi(. | x_t),   t = 2..T

Sampling writes every attempt into one cache (`sampling.generate`, the one generation
path); `loss_layout` lays the same tokens out as [prompt | y_1 buffer | instr | ... |
y_T buffer] for the loss. Both give the same log-probs because the model only sees valid
tokens and their positions (README "Design"). Rewards come from the task's verifier, for
every attempt of a batch in one call. Also here: episodes whose first attempt comes from
another model (offline first attempts; MBPP-R repair of given attempts) and supervised
transcripts in the same layout. Everything returned is host NumPy.

With several processes (hosts.py) every list of problems given here is this process's
share: it is sampled on this process's devices and scored on its host; `gather` makes the
whole batch (texts and rewards included) for metrics and reports.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from score_jax import hosts
from score_jax import sampling
from score_jax import sharding
from score_jax.tasks import formats
from score_jax.tasks.base import Problem, Task


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


def right_pad(token_lists, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Attempts (stop token included) in a fixed buffer -> (tokens_BxL, valid_BxL)."""
  tokens_BxL = np.full((len(token_lists), length), pad_id, np.int32)
  for i, tokens in enumerate(token_lists):
    if len(tokens) > length:
      raise ValueError(f'an attempt of {len(tokens)} tokens exceeds the attempt length '
                       f'{length}; raise config.rollout.max_len')
    tokens_BxL[i, :len(tokens)] = tokens
  lengths_B = np.asarray([len(t) for t in token_lists])
  return tokens_BxL, np.arange(length)[None, :] < lengths_B[:, None]


@dataclasses.dataclass
class Batch:
  """Episodes of T attempts (host NumPy); `rewards_BxT` and `texts` once scored."""
  problems: list
  prompt_BxP: np.ndarray
  prompt_valid_BxP: np.ndarray
  tokens_TxBxL: np.ndarray  # attempt t of episode b; pad after its stop token
  valid_TxBxL: np.ndarray
  truncated_TxB: np.ndarray  # no stop token within max_len
  onpolicy_BxT: np.ndarray  # False: attempt came from another model (no gradient)
  rewards_BxT: Optional[np.ndarray] = None
  texts: Optional[list[list[str]]] = None  # [T][B]

  @property
  def turns(self) -> int:
    return self.tokens_TxBxL.shape[0]

  def attempt_tokens(self, t: int) -> list[list[int]]:
    """Valid tokens of attempt t (0-based) of each episode, stop token included."""
    return [row[v].tolist() for row, v in zip(self.tokens_TxBxL[t], self.valid_TxBxL[t])]

  def lengths_TxB(self) -> np.ndarray:
    return self.valid_TxBxL.sum(axis=2)


def concatenate(batches: Sequence[Batch]) -> Batch:
  """Episodes of several batches with the same number of attempts, in order."""
  cat = lambda name: np.concatenate([getattr(b, name) for b in batches],
                                    axis=1 if name.endswith(('_TxBxL', '_TxB')) else 0)
  out = Batch(problems=[p for b in batches for p in b.problems],
              **{f.name: cat(f.name) for f in dataclasses.fields(Batch)
                 if f.name not in ('problems', 'rewards_BxT', 'texts')})
  if all(b.rewards_BxT is not None for b in batches):
    out.rewards_BxT = cat('rewards_BxT')
    out.texts = [sum((b.texts[t] for b in batches), []) for t in range(out.turns)]
  return out


def gather(batch: Batch, problems: Sequence[Problem]) -> Batch:
  """The whole batch from every process's scored share (`problems`: all of them, in
  process order); the identity with one process."""
  if jax.process_count() == 1:
    return batch
  arrays = hosts.allgather(dict(
      prompt_BxP=batch.prompt_BxP, prompt_valid_BxP=batch.prompt_valid_BxP,
      tokens_BxTxL=batch.tokens_TxBxL.transpose(1, 0, 2),
      valid_BxTxL=batch.valid_TxBxL.transpose(1, 0, 2), truncated_BxT=batch.truncated_TxB.T,
      onpolicy_BxT=batch.onpolicy_BxT, rewards_BxT=batch.rewards_BxT))
  texts = hosts.allgather_texts([text for per_turn in batch.texts for text in per_turn])
  local, turns = len(batch.problems), batch.turns
  per_host = [texts[i:i + local * turns] for i in range(0, len(texts), local * turns)]
  return Batch(problems=list(problems), prompt_BxP=arrays['prompt_BxP'],
               prompt_valid_BxP=arrays['prompt_valid_BxP'],
               tokens_TxBxL=arrays['tokens_BxTxL'].transpose(1, 0, 2),
               valid_TxBxL=arrays['valid_BxTxL'].transpose(1, 0, 2),
               truncated_TxB=arrays['truncated_BxT'].T.copy(),
               onpolicy_BxT=arrays['onpolicy_BxT'], rewards_BxT=arrays['rewards_BxT'],
               texts=[sum((h[t * local:(t + 1) * local] for h in per_host), [])
                      for t in range(turns)])


def loss_layout(batch: Batch, instr_I: np.ndarray) -> dict:
  """[prompt | y_1 | instr | y_2 | ... | y_T] -> tokens, valid and `turn` ([B, S]: t on
  the valid tokens of attempt t, 0 elsewhere), with rewards and on-policy flags."""
  B, I = batch.prompt_BxP.shape[0], len(instr_I)
  instr_BxI = np.broadcast_to(instr_I, (B, I))
  tokens, valid, turn = [batch.prompt_BxP], [batch.prompt_valid_BxP], [
      np.zeros(batch.prompt_BxP.shape, np.int32)]
  for t in range(batch.turns):
    if t:
      tokens.append(instr_BxI)
      valid.append(np.ones((B, I), bool))
      turn.append(np.zeros((B, I), np.int32))
    tokens.append(batch.tokens_TxBxL[t])
    valid.append(batch.valid_TxBxL[t])
    turn.append((t + 1) * batch.valid_TxBxL[t].astype(np.int32))
  out = dict(tokens=np.concatenate(tokens, 1).astype(np.int32),
             valid=np.concatenate(valid, 1), turn=np.concatenate(turn, 1),
             onpolicy=batch.onpolicy_BxT)
  if batch.rewards_BxT is not None:
    out['rewards'] = batch.rewards_BxT
  return out


def rl_problems(task: Task, seed: int, phase_index: int, step: int, num_prompts: int,
                samples_per_prompt: int) -> list[Problem]:
  """Training problems of one step, each repeated k times in a row (RLOO groups).

  Seeded by (seed, phase, step), so a resumed run sees exactly the problems it would
  have seen.
  """
  rng = np.random.default_rng([seed, phase_index, step])
  return [p for p in task.train_problems(rng, num_prompts) for _ in range(samples_per_prompt)]


class Episodes:
  """Episodes of one task, tokenizer, prompt format and model; holds the compiled
  generation (one per number of attempts and context length)."""

  def __init__(self, model, shardings, tok, task: Task, fmt: formats.PromptFormat,
               rollout_cfg):
    """`shardings`: (params, batch, replicated) shardings of the mesh."""
    self.model, self.tok, self.task, self.fmt = model, tok, task, fmt
    self.param_sh, self.batch_sh, self.repl_sh = shardings
    self.mesh = getattr(self.batch_sh, 'mesh', None)
    self.max_prompt_len, self.max_len = rollout_cfg.max_prompt_len, rollout_cfg.max_len
    self.slots, self.live_spans = rollout_cfg.slots, rollout_cfg.live_spans
    self.instr_I = np.asarray(tok.encode(fmt.instruction_text(task)), np.int32)
    stops = formats.stop_ids(tok, fmt)
    self.stop_ids = sampling.stop_set(None, stops)
    self.turn_end = stops[-1]  # What ends a model turn: EOS, or <end_of_turn> in chat.
    self.pad_id = tok.pad_id

  # -- token layouts ------------------------------------------------------------------

  def prompt_ids(self, problem: Problem) -> list[int]:
    bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
    return bos + self.tok.encode(self.fmt.prompt_text(self.task, problem))

  def prompts(self, problems: Sequence[Problem]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [BOS, prompt] ids -> (tokens_BxP, valid_BxP)."""
    return left_pad([self.prompt_ids(p) for p in problems], self.max_prompt_len, self.pad_id)

  def transcript_batch(self, problems: Sequence[Problem],
                       attempts: Sequence[Sequence[str]]) -> Batch:
    """Given attempt texts (supervised transcripts, offline traces) as a `Batch`; each
    attempt ends with the format's end-of-turn token, as a sampled one would."""
    prompt, prompt_valid = self.prompts(problems)
    turns = len(attempts[0])
    buffers = [right_pad([self.tok.encode(a[t]) + [self.turn_end] for a in attempts],
                         self.max_len, self.pad_id) for t in range(turns)]
    B = len(problems)
    return Batch(problems=list(problems), prompt_BxP=prompt, prompt_valid_BxP=prompt_valid,
                 tokens_TxBxL=np.stack([b[0] for b in buffers]),
                 valid_TxBxL=np.stack([b[1] for b in buffers]),
                 truncated_TxB=np.zeros((turns, B), bool),
                 onpolicy_BxT=np.zeros((B, turns), bool))

  # -- sampling -------------------------------------------------------------------------

  @functools.cached_property
  def _instr_on_device(self):
    return hosts.to_global(self.instr_I, self.repl_sh)

  @functools.lru_cache(maxsize=None)
  def _generate(self, turns: int):
    def generate(params, context_BxC, valid_BxC, instr_I, rng, sample_params):
      kw = dict(turns=turns, max_len=self.max_len, stop_ids=self.stop_ids, pad_id=self.pad_id,
                instr_I=instr_I, spans=self.live_spans)
      if 0 < self.slots < context_BxC.shape[0]:  # a queue through fewer cache rows
        return sampling.generate_queue(self.model, {'params': params}, context_BxC, valid_BxC,
                                       rng, sample_params, slots=self.slots, **kw)
      return sampling.generate(self.model, {'params': params}, context_BxC, valid_BxC, rng,
                               sample_params, **kw)
    return sharding.under_mesh(self.mesh, jax.jit(generate, in_shardings=(
        self.param_sh, self.batch_sh, self.batch_sh, self.repl_sh, self.repl_sh, self.repl_sh),
        out_shardings=self.batch_sh))

  def _attempt_chunks(self, params, context_BxC, valid_BxC, rng, sample_params, turns,
                      batch_size) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """`turns` attempts after this process's contexts, `batch_size` rows of the global
    batch per compiled call (0 = all), which bounds the KV cache's memory. Every call is
    dispatched before the first is fetched: the device queues them, so whatever the caller
    does with one chunk (decoding, the verifier) runs while the device samples the next.
    Yields (rows, [tokens_TxBxL, valid_TxBxL, truncated_TxB]) of this process's rows, in
    order. `rng`: a key replicated on every device (hosts.key)."""
    local = batch_size // jax.process_count() or len(context_BxC)
    starts = range(0, len(context_BxC), local)
    keys = [rng] if len(starts) == 1 else jax.random.split(rng, len(starts))
    sample_params = sampling.SampleParams(*hosts.to_global(
        tuple(np.asarray(v) for v in sample_params), self.repl_sh))
    pending = []
    for start, key in zip(starts, keys):
      rows = slice(start, start + local)
      pending.append((rows, self._generate(turns)(
          params, hosts.to_global(context_BxC[rows], self.batch_sh),
          hosts.to_global(valid_BxC[rows], self.batch_sh), self._instr_on_device, key,
          sample_params)))
    for rows, samples in pending:
      yield rows, [np.stack([hosts.local_rows(getattr(s, f)) for s in samples])
                   for f in ('tokens_BxT', 'valid_BxT', 'truncated_B')]

  def sample_chunks(self, params, problems: Sequence[Problem], rng, sample_params, turns: int,
                    batch_size: int = 0) -> Iterator[Batch]:
    """`turns` attempts by the policy `params` at each problem (unscored), one `Batch`
    per compiled call as the device finishes it (`_attempt_chunks`)."""
    prompt, prompt_valid = self.prompts(problems)
    for rows, (tokens, valid, truncated) in self._attempt_chunks(
        params, prompt, prompt_valid, rng, sample_params, turns, batch_size):
      yield Batch(problems=list(problems[rows]), prompt_BxP=prompt[rows],
                  prompt_valid_BxP=prompt_valid[rows], tokens_TxBxL=tokens, valid_TxBxL=valid,
                  truncated_TxB=truncated, onpolicy_BxT=np.ones((len(tokens[0]), turns), bool))

  def sample(self, params, problems: Sequence[Problem], rng, sample_params, turns: int,
             batch_size: int = 0) -> Batch:
    """`turns` attempts by the policy `params` at each problem (unscored)."""
    return concatenate(list(self.sample_chunks(params, problems, rng, sample_params, turns,
                                               batch_size)))

  def continue_chunks(self, params, first: Batch, rng, sample_params, turns: int,
                      batch_size: int = 0) -> Iterator[Batch]:
    """Attempts 2..`turns` by `params` after the given first attempts (e.g. sampled by the
    reference: offline first attempts), chunk by chunk like `sample_chunks`. The context
    [prompt | y_1 | instr] has the loss layout's gaps, which the model never sees."""
    B, I = first.prompt_BxP.shape[0], len(self.instr_I)
    context = np.concatenate([first.prompt_BxP, first.tokens_TxBxL[0],
                              np.broadcast_to(self.instr_I, (B, I))], 1)
    context_valid = np.concatenate(
        [first.prompt_valid_BxP, first.valid_TxBxL[0], np.ones((B, I), bool)], 1)
    for rows, (tokens, valid, truncated) in self._attempt_chunks(
        params, context, context_valid, rng, sample_params, turns - 1, batch_size):
      onpolicy = np.ones((len(tokens[0]), turns), bool)
      onpolicy[:, 0] = False
      yield Batch(problems=list(first.problems[rows]), prompt_BxP=first.prompt_BxP[rows],
                  prompt_valid_BxP=first.prompt_valid_BxP[rows],
                  tokens_TxBxL=np.concatenate([first.tokens_TxBxL[:1, rows], tokens]),
                  valid_TxBxL=np.concatenate([first.valid_TxBxL[:1, rows], valid]),
                  truncated_TxB=np.concatenate([first.truncated_TxB[:1, rows], truncated]),
                  onpolicy_BxT=onpolicy)

  def repair(self, params, problems: Sequence[Problem], first_attempts: Sequence[str], rng,
             sample_params) -> list[str]:
    """The second attempt after given first-attempt texts (MBPP-R). The context is built
    exactly like a live turn 2, left-padded as a whole, so a long first attempt may use
    room a short prompt left."""
    contexts = [self.prompt_ids(p) + self.tok.encode(a) + [self.turn_end] + self.instr_I.tolist()
                for p, a in zip(problems, first_attempts)]
    tokens, valid = left_pad(contexts, self.max_prompt_len + self.max_len + len(self.instr_I),
                             self.pad_id)
    [(_, (out_tokens, out_valid, _))] = self._attempt_chunks(params, tokens, valid, rng,
                                                             sample_params, 1, 0)
    return [self.tok.decode(row[v]) for row, v in zip(out_tokens[0], out_valid[0])]

  # -- rewards --------------------------------------------------------------------------

  def score(self, batch: Batch) -> Batch:
    """Decodes every attempt and fills `texts` and `rewards_BxT` (one verifier call for
    the whole batch, so a parallel verifier sees it all at once)."""
    texts = [[self.tok.decode(t) for t in batch.attempt_tokens(i)] for i in range(batch.turns)]
    flat = self.task.rewards(sum(texts, []), list(batch.problems) * batch.turns)
    batch.texts = texts
    batch.rewards_BxT = np.asarray(flat, np.float32).reshape(batch.turns, -1).T.copy()
    return batch

  def score_chunks(self, chunks: Iterable[Batch], times: Optional[dict] = None) -> Batch:
    """Scores each chunk as it arrives (`sample_chunks`), so the verifier works on one
    while the device samples the next; the scored chunks as one batch. `times`, if
    given, gets `sample_time` (seconds waiting for the device) and `score_time` (seconds
    in the verifier, all but the last chunk's hidden behind sampling)."""
    scored, waited, scoring = [], 0.0, 0.0
    chunks = iter(chunks)
    while True:
      t0 = time.perf_counter()
      chunk = next(chunks, None)
      t1 = time.perf_counter()
      waited += t1 - t0
      if chunk is None:
        break
      scored.append(self.score(chunk))
      scoring += time.perf_counter() - t1
    if times is not None:
      times.update(sample_time=waited, score_time=scoring)
    return concatenate(scored)
