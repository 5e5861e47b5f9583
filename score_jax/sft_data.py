"""What a supervised phase trains on (config_defaults.sft_phase `data`): rows of
(problem, attempt texts, which attempts get the loss), laid out by episodes.py like any
episode.

  transcripts   the task's simulated student (how an embedded base model is made)
  star          a model's own episodes that turned a wrong first attempt into a right one
  star_right    its episodes whose last attempt is right and not worse than the first
  pair          its wrong and right first attempts at one problem, as [wrong, right]
"""
import dataclasses
import json
import os

import numpy as np

from score_jax import episodes as episodes_lib
from score_jax import evaluate
from score_jax import hosts
from score_jax import sampling
from score_jax.tasks.base import Problem

Row = tuple  # (problem, attempt texts, which attempts get the loss)


class NoData(Exception):
  """A phase's batch source has nothing to train on (e.g. STaR kept no episode)."""


def star_rows(batch: episodes_lib.Batch, keep: str) -> list[Row]:
  """The scored episodes STaR keeps. 'star': a wrong first attempt turned right by the
  last, the loss on the last; 'star_right': the last attempt right and not worse than the
  first, the loss on every right attempt."""
  rows = []
  for i, p in enumerate(batch.problems):
    r = batch.rewards_BxT[i] > 0.5
    attempts = [batch.texts[t][i] for t in range(batch.turns)]
    if keep == 'star' and not r[0] and r[-1]:
      rows.append((p, attempts, [False] * (batch.turns - 1) + [True]))
    elif keep == 'star_right' and r[-1] and r[-1] >= r[0]:
      rows.append((p, attempts, r.tolist()))
  return rows


def pair_rows(batch: episodes_lib.Batch, k: int, rng: np.random.Generator) -> list[Row]:
  """Pair-SFT: in each group of k single attempts at one problem, every wrong attempt is
  paired with one of the right ones (drawn with `rng`) as [wrong, right]; the loss on the
  right one."""
  rows = []
  for g in range(0, len(batch.problems), k):
    r = batch.rewards_BxT[g:g + k, 0] > 0.5
    texts = batch.texts[0][g:g + k]
    right = [t for t, ok in zip(texts, r) if ok]
    for text, ok in zip(texts, r):
      if not ok and right:
        rows.append((batch.problems[g], [text, right[rng.integers(len(right))]], [False, True]))
  return rows


def finished_rows(rows: list[Row], encode, max_len: int) -> list[Row]:
  """The rows whose every attempt is a finished turn. A row trains on its attempts as
  turns that end with the end-of-turn token (episodes.transcript_batch), so an attempt
  that ran to `max_len` tokens was cut off, and would not fit with that token: drop it."""
  return [row for row in rows if all(len(encode(a)) < max_len for a in row[1])]


def transcript_rows(task, phase, seed: int):
  """The task's simulated student (the embedded base model's data), fresh each step."""
  def rows_fn(params, step):
    del params  # Off-policy data.
    rng = np.random.default_rng([seed, phase.index, step])
    return [(q, a, [True] * len(a))
            for q, a in task.base_transcripts(rng, phase.cfg.batch_size, phase.turns)]
  return rows_fn


def self_generated_rows(config, eps, phase, directory: str):
  """STaR / Pair-SFT data: at the start of each of `rounds` equal parts of the phase,
  `samples / rounds` episodes drawn from the current params (at the rollout temperature)
  and filtered (star_rows / pair_rows); saved as <directory>/round<r>.jsonl, so a
  resumed phase trains on the same data. Batches are drawn from the round's rows with
  (seed, phase, step). Every process samples its share, holds all rows (the episodes
  are gathered) and trains on its share of each batch (train.sft_phase)."""
  cfg, p, rl, r = config, phase.cfg, config.rl, config.rollout
  sample_params = sampling.SampleParams.create(r.temperature, r.top_k, r.top_p)
  per_call = rl.num_prompts * rl.samples_per_prompt
  rows_of = {}

  def generate(params, rnd: int):
    rng = np.random.default_rng([cfg.seed, phase.index, 1_000_000 + rnd])
    turns = 1 if p.data == "pair" else phase.turns
    rows, n, sampled, unfinished = [], p.samples // p.rounds, 0, 0
    while sampled < n:
      problems = [q for q in eps.task.train_problems(rng, rl.num_prompts)
                  for _ in range(rl.samples_per_prompt)]
      key = hosts.key(cfg.seed, phase.index * 1_000_003 + 500_000 + sampled)
      mine = eps.score_chunks(eps.sample_chunks(params, hosts.local_share(problems), key,
                                                sample_params, turns, r.batch_size))
      batch = episodes_lib.gather(mine, problems)
      kept = (pair_rows(batch, rl.samples_per_prompt, rng) if p.data == "pair"
              else star_rows(batch, p.data))
      finished = finished_rows(kept, eps.tok.encode, eps.max_len)
      rows, unfinished = rows + finished, unfinished + len(kept) - len(finished)
      sampled += per_call
    print(f"[{phase.name}] round {rnd}: kept {len(rows)} of {sampled} sampled episodes "
          f"({p.data}; {unfinished} more dropped, an attempt ran to rollout.max_len)",
          flush=True)
    if not rows:
      raise NoData(f"[{phase.name}] {p.data} kept none of {sampled} episodes: nothing to "
                   "train on; the phase hands on its init's params")
    return rows

  def rows_fn(params, step):
    rnd = step * p.rounds // p.steps
    if rnd not in rows_of:
      path = os.path.join(directory, f"round{rnd}.jsonl")
      if os.path.exists(path):
        with open(path) as f:
          rows_of[rnd] = [(Problem(**d["problem"]), d["attempts"], d["trained"])
                          for d in map(json.loads, f)]
      else:
        rows_of[rnd] = generate(params, rnd)
        evaluate.write_jsonl(path, (dict(problem=dataclasses.asdict(q), attempts=a, trained=m)
                                    for q, a, m in rows_of[rnd]))
    rows = rows_of[rnd]
    picks = np.random.default_rng([cfg.seed, phase.index, step]).integers(len(rows),
                                                                          size=p.batch_size)
    return [rows[i] for i in picks]
  return rows_fn
