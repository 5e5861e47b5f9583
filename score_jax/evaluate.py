"""Evaluation, in one place: the paper's metrics (SCORE.md), greedy evaluation of a phase's
params on held-out problems, MBPP-R repair, and the report (table, JSON, plot, transcripts).

The metric and report functions are NumPy / Matplotlib only; the evaluation at the end
drives `episodes.Episodes`.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein


# ---------------------------------------------------------------------------------------
# Metrics.


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance (unit insert / delete / substitute) between two sequences of
  hashables (token ids, characters), by rapidfuzz (bit-parallel, in C)."""
  a = a.tolist() if isinstance(a, np.ndarray) else a
  b = b.tolist() if isinstance(b, np.ndarray) else b
  return Levenshtein.distance(a, b)


def edit_distance_ratio(a: Sequence, b: Sequence) -> float:
  """edit_distance / (len(a) + len(b)), in [0, 1]; 0.0 when both are empty."""
  total = len(a) + len(b)
  return edit_distance(a, b) / total if total else 0.0


def _flips(right_B, later_B) -> dict[str, float]:
  return {'delta': float(later_B.mean() - right_B.mean()),
          'i2c': float((~right_B & later_B).mean()), 'c2i': float((right_B & ~later_B).mean())}


def self_correction_metrics(rewards_BxT, attempts: Sequence[Sequence[Sequence[int]]],
                            truncated_TxB) -> dict[str, float]:
  """The SCORE.md metrics over n episodes of T attempts; all fractions of the n problems.

  rewards_BxT: binary rewards. attempts[t][b]: the tokens of attempt t+1 of episode b (the
  caller decides whether the stop token counts; be consistent). truncated_TxB: no stop
  token within the budget. Δ, Δi→c and Δc→i compare the first and the last attempt, the
  conditional correction rate is P(right at the last | wrong at the first); with more than
  two attempts each consecutive pair also gets `delta_t{t}_t{t+1}` etc. The edit-distance
  ratio is taken between consecutive attempts (its mean and its share of zeros, which
  is the share of copied attempts, over all pairs).
  """
  right_BxT = np.asarray(rewards_BxT, np.float64) > 0.5
  if right_BxT.ndim != 2 or right_BxT.shape[0] == 0:
    raise ValueError('self_correction_metrics needs rewards [n >= 1 episodes, T attempts]')
  n, T = right_BxT.shape
  truncated_TxB = np.asarray(truncated_TxB, bool)
  sizes = {len(a) for a in attempts} | {truncated_TxB.shape[1]}
  if len(attempts) != T or truncated_TxB.shape[0] != T or sizes != {n}:
    raise ValueError(f'inputs disagree on the number of episodes or attempts: rewards {n}x{T}, '
                     f'attempts {len(attempts)}x{sorted(sizes)}, truncated {truncated_TxB.shape}')
  out = {f'acc_t{t + 1}': float(right_BxT[:, t].mean()) for t in range(T)}
  flips = _flips(right_BxT[:, 0], right_BxT[:, -1])
  out.update(delta=flips['delta'], delta_i2c=flips['i2c'], delta_c2i=flips['c2i'])
  wrong_first = ~right_BxT[:, 0]
  out['correct_given_wrong'] = (float(right_BxT[wrong_first, -1].mean()) if wrong_first.any()
                                else 0.0)
  ratios_PxB = np.array([[edit_distance_ratio(a, b) for a, b in zip(attempts[t], attempts[t + 1])]
                         for t in range(T - 1)]).reshape(T - 1, n)
  out['edit_ratio_mean'] = float(ratios_PxB.mean()) if T > 1 else 0.0
  out['edit_ratio_zero_share'] = float((ratios_PxB == 0).mean()) if T > 1 else 0.0
  if T > 2:
    for t in range(T - 1):
      pair = f't{t + 1}_t{t + 2}'
      f = _flips(right_BxT[:, t], right_BxT[:, t + 1])
      out.update({f'delta_{pair}': f['delta'], f'delta_i2c_{pair}': f['i2c'],
                  f'delta_c2i_{pair}': f['c2i'], f'edit_ratio_{pair}': float(ratios_PxB[t].mean())})
  out.update({f'truncated_t{t + 1}': float(truncated_TxB[t].mean()) for t in range(T)})
  out['edit_ratio_hist'] = np.histogram(ratios_PxB, bins=HIST_BINS, range=(0.0, 1.0))[0].tolist()
  out['n'] = n
  return out


HIST_BINS = 20  # of the consecutive-attempt edit ratio in [0, 1] (the paper's collapse figure)


def majority_vote(keys: Sequence, rewards: Sequence[float]) -> float:
  """The reward of the most common answer among samples (ties: the first to appear);
  samples without an answer (key None) do not vote; no answer at all scores 0."""
  counts: dict = {}
  for key, r in zip(keys, rewards):
    if key is not None:
      counts.setdefault(key, [0, r])[0] += 1
  if not counts:
    return 0.0
  return float(max(counts.values(), key=lambda c: c[0])[1])  # max keeps the first of ties


# ---------------------------------------------------------------------------------------
# Reporting.

# (header, metric key, format); fractions are shown as percentages. Per-turn columns come
# from `_turn_columns`.
_FLIP_COLUMNS = (
    ('Δ', 'delta', '{:+.1f}'),
    ('Δi→c', 'delta_i2c', '{:.1f}'),
    ('Δc→i', 'delta_c2i', '{:.1f}'),
    ('edit', 'edit_ratio_mean', '{:.3f}'),
    ('edit=0', 'edit_ratio_zero_share', '{:.1f}'),
)
# Shown only when some model has them.
_OPTIONAL_COLUMNS = (('MBPP-R', 'repair_acc', '{:.1f}'),)  # code tasks with eval.repair_path


def _turns(results: Mapping[str, Mapping[str, float]]) -> int:
  return max(sum(k.startswith('acc_t') for k in m) for m in results.values())


def _turn_columns(turns: int):
  acc = tuple((f'Acc@t{t}', f'acc_t{t}', '{:.1f}') for t in range(1, turns + 1))
  pairs = () if turns <= 2 else tuple(
      (f'Δt{t}t{t + 1}', f'delta_t{t}_t{t + 1}', '{:+.1f}') for t in range(1, turns))
  trunc = tuple((f'trunc{t}', f'truncated_t{t}', '{:.1f}') for t in range(1, turns + 1))
  return acc, pairs, trunc


def _is_fraction(key: str) -> bool:
  return key.startswith(('acc_t', 'delta', 'truncated_t')) or key in (
      'edit_ratio_zero_share', 'repair_acc', 'correct_given_wrong')


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Fixed-width table, one row per model; percentages except the edit ratio and n."""
  def cell(key, fmt, value):
    if value is None:
      return '-'
    return fmt.format(int(value) if key == 'n' else
                      100 * value if _is_fraction(key) else value)

  acc, pairs, trunc = _turn_columns(_turns(results))
  columns = acc + _FLIP_COLUMNS[:1] + pairs + _FLIP_COLUMNS[1:] + trunc + (
      ('n', 'n', '{:d}'),) + tuple(c for c in _OPTIONAL_COLUMNS
                                   if any(c[1] in m for m in results.values()))
  header = ['model'] + [h for h, _, _ in columns]
  rows = [[name] + [cell(k, f, m.get(k)) for _, k, f in columns]
          for name, m in results.items()]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '  '.join([r[0].ljust(widths[0])] +
                             [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
  return '\n'.join([line(header), '  '.join('-' * w for w in widths)] +
                   [line(r) for r in rows])


def _atomic_path(path: str | os.PathLike) -> tuple[str, str]:
  """(final path, temp path in the same directory) for a write-then-rename."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  os.close(fd)
  return path, tmp


def _replace(tmp: str, path: str, write) -> None:
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def plot_table(results: Mapping[str, Mapping[str, float]], png_path: str | os.PathLike,
               title: str = 'Self-correction') -> None:
  """Grouped bars per model: Acc@t1, Acc@t2, Δi→c, Δc→i (percent); written atomically."""
  if not _writes():
    return
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  bars = tuple((f'Acc@t{t}', f'acc_t{t}') for t in range(1, _turns(results) + 1)) + (
      ('Δi→c', 'delta_i2c'), ('Δc→i', 'delta_c2i'))
  names = list(results)
  x = np.arange(len(names))
  width = 0.8 / len(bars)
  fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(names) + 2), 3.5))
  for k, (label, key) in enumerate(bars):
    values = [100 * results[n].get(key, 0.0) for n in names]
    rects = ax.bar(x + (k - (len(bars) - 1) / 2) * width, values, width, label=label)
    ax.bar_label(rects, fmt='%.1f', fontsize=7)
  ax.set_xticks(x, names)
  ax.set_ylabel('% of problems')
  ax.set_ylim(0, 105)
  ax.set_title(title)
  ax.legend(ncols=len(bars), fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.1))
  fig.tight_layout()
  path, tmp = _atomic_path(png_path)
  _replace(tmp, path, lambda p: fig.savefig(p, format='png', dpi=120))
  plt.close(fig)


def _json_default(x: Any):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')


def _writes() -> bool:
  """Only process 0 writes the run's files (hosts.py); the metrics above stay NumPy-only."""
  from score_jax import hosts
  return hosts.is_writer()


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """One JSON document (NumPy values allowed), written atomically (by process 0)."""
  if not _writes():
    return

  def write(p):
    with open(p, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2, default=_json_default)

  path, tmp = _atomic_path(path)
  _replace(tmp, path, write)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """One JSON object per line (NumPy values allowed), written atomically (by process 0)."""
  if not _writes():
    return

  def write(p):
    with open(p, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + '\n')

  path, tmp = _atomic_path(path)
  _replace(tmp, path, write)


def report(out_dir: str, results: Mapping[str, Mapping[str, Any]]) -> str:
  """table.json, table.png and the printed table of `results` (model -> metrics)."""
  write_json(os.path.join(out_dir, 'table.json'), results)
  plot_table(results, os.path.join(out_dir, 'table.png'))
  table = format_table(results)
  print(f'\nSelf-correction on held-out problems (greedy, {_turns(results)} attempts):\n{table}')
  print(f'\nwritten: {out_dir}/table.json, {out_dir}/table.png, {out_dir}/transcripts_*.jsonl')
  return table


# ---------------------------------------------------------------------------------------
# Evaluation of params on held-out problems.


def padded_batches(items: Sequence, batch_size: int):
  """(start, batch, n): consecutive batches of `batch_size`, the last padded with repeats
  of its final item so every compiled call has one shape; only the first n are real."""
  for start in range(0, len(items), batch_size):
    batch = list(items[start:start + batch_size])
    n = len(batch)
    yield start, batch + [batch[-1]] * (batch_size - n), n


def transcript_rows(batch, n: int) -> list[dict]:
  """The first n episodes of a scored `episodes.Batch` as readable rows."""
  rows = []
  for i in range(n):
    p = batch.problems[i]
    row = dict(id=p.id, problem=p.prompt, answer=p.answer)
    for t in range(batch.turns):
      row[f'y{t + 1}'] = batch.texts[t][i]
      row[f'r{t + 1}'] = batch.rewards_BxT[i, t]
    tokens = [batch.attempt_tokens(t)[i] for t in range(batch.turns)]
    ratios = [edit_distance_ratio(a, b) for a, b in zip(tokens, tokens[1:])]
    row['edit_ratio'] = ratios[0] if len(ratios) == 1 else ratios
    rows.append(row)
  return rows


def evaluate_params(episodes, params, problems: Sequence, turns: int, batch_size: int,
                    transcripts_path: str | os.PathLike, num_transcripts: int,
                    temperature: float = 0.0) -> dict:
  """Self-correction metrics of `params` over `problems` (greedy by default), batch by
  batch, plus sample transcripts. The last batch is padded with repeats so every call has
  the same shape (no recompile). Each process samples and scores its share of a batch."""
  rewards, attempts, truncated, rows = [], [[] for _ in range(turns)], [], []
  for start, problem_batch, n in padded_batches(problems, batch_size):
    batch = sample_scored(episodes, params, problem_batch, (start,), temperature, turns)
    rewards.append(batch.rewards_BxT[:n])
    truncated.append(batch.truncated_TxB[:, :n])
    for t in range(turns):
      attempts[t] += batch.attempt_tokens(t)[:n]
    rows += transcript_rows(batch, min(n, num_transcripts - len(rows)))
  write_jsonl(transcripts_path, rows)
  return self_correction_metrics(np.concatenate(rewards), attempts,
                                 np.concatenate(truncated, axis=1))


def sample_scored(episodes, params, problems: Sequence, seed: tuple, temperature: float,
                  turns: int):
  """All of `problems` sampled and scored, each process its share; the whole batch."""
  from score_jax import episodes as episodes_lib  # Kept local: the metrics are NumPy-only.
  from score_jax import hosts
  from score_jax import sampling
  local = episodes.score(episodes.sample(params, hosts.local_share(problems), hosts.key(*seed),
                                         sampling.SampleParams.create(temperature), turns))
  return episodes_lib.gather(local, problems)


def _repairs(episodes, params, problems: Sequence, first_attempts: Sequence[str],
             seed: int) -> list[str]:
  """Greedy second attempts after given first attempts, each process its share."""
  from score_jax import hosts
  from score_jax import sampling
  return hosts.allgather_texts(episodes.repair(
      params, hosts.local_share(problems), hosts.local_share(first_attempts), hosts.key(seed),
      sampling.SampleParams.create(0.0)))


@functools.lru_cache(maxsize=None)
def _repair_set(task, path: str):
  """(MBPP-R episodes, accuracy of their given first attempts), built and sandboxed once
  per run rather than at every phase's evaluation."""
  from score_jax.tasks import code  # Code tasks only.
  mbpp = getattr(task, 'mbpp', task)
  if not isinstance(mbpp, code.MBPPTask):
    raise ValueError(f'config.eval.repair_path needs an MBPP-based code task (mbpp, or '
                     f'humaneval with train_path); the task is {task.name!r}')
  repair = code.MBPPRepair(mbpp, path)
  return repair, float(repair.first_attempt_rewards().mean())


def evaluate_repair(episodes, params, path: str, batch_size: int,
                    transcripts_path: str | os.PathLike) -> dict:
  """MBPP-R (SCORE.md): the model corrects given first attempts, greedily; only the
  correction is scored."""
  repair, given_acc = _repair_set(episodes.task, path)
  texts = []
  for start, batch, n in padded_batches(repair.episodes, batch_size):
    texts += _repairs(episodes, params, [e.problem for e in batch],
                      [e.first_attempt for e in batch], start)[:n]
  rewards = repair.score(texts)
  write_jsonl(transcripts_path, (dict(id=e.problem.id, first_attempt=e.first_attempt, y2=t, r2=r)
                                 for e, t, r in zip(repair.episodes, texts, rewards)))
  return dict(repair_acc=float(rewards.mean()), repair_n=len(rewards),
              repair_given_acc=given_acc)


def evaluate_phase(episodes, name: str, params, eval_cfg, turns: int, out_dir: str,
                   **record) -> dict:
  """Greedy evaluation of one phase's params on the held-out problems (and MBPP-R when
  `eval_cfg.repair_path` is set); writes <out_dir>/<name>.json and its transcripts.
  `record` (checkpoint step, fingerprint) is stored beside the metrics."""
  problems = episodes.task.eval_problems(eval_cfg.num_problems)
  result = evaluate_params(episodes, params, problems, turns, eval_cfg.batch_size,
                           os.path.join(out_dir, f'transcripts_{name}.jsonl'),
                           eval_cfg.num_transcripts)
  if eval_cfg.repair_path:
    result.update(evaluate_repair(episodes, params, eval_cfg.repair_path, eval_cfg.batch_size,
                                  os.path.join(out_dir, f'transcripts_repair_{name}.jsonl')))
  result.update(phase=name, **record)
  write_json(os.path.join(out_dir, f'{name}.json'), result)
  print(f'[eval {name}]\n{format_table({name: result})}', flush=True)
  return result


def inference_scaling(episodes, params, problems: Sequence, max_k: int, batch_size: int,
                      temperature: float = 0.7, seed: int = 0) -> dict:
  """SCORE.md "inference-time scaling": for a budget of 2K samples per problem, the
  majority vote over 2K parallel first attempts against the vote over the second attempts
  of K parallel first attempts, each self-corrected once; K = 1..max_k.

  Per problem: max_k two-attempt episodes and max_k more single first attempts, all at
  `temperature`; the curves use prefixes of them, so every K sees the same samples.
  """
  task, n = episodes.task, len(problems)
  repeated = [p for p in problems for _ in range(max_k)]  # problem-major: [n * max_k]

  def attempts(turns: int, salt: int):
    keys, rewards = [], []
    for start, batch, m in padded_batches(repeated, batch_size):
      b = sample_scored(episodes, params, batch, (seed * 7919 + salt + start,), temperature,
                        turns)
      keys += [[task.answer_key(b.texts[t][i]) for t in range(turns)] for i in range(m)]
      rewards += b.rewards_BxT[:m].tolist()
    shape = (n, max_k, turns)
    return np.asarray(keys, object).reshape(shape), np.asarray(rewards).reshape(shape)
  keys2, rewards2 = attempts(2, 0)  # [n, K, 2]
  keys1, rewards1 = attempts(1, 1 << 20)  # [n, K, 1]
  out = dict(k=list(range(1, max_k + 1)), parallel=[], sequential=[], n=n,
             temperature=temperature)
  for k in out['k']:
    par = [majority_vote(list(keys2[i, :k, 0]) + list(keys1[i, :k, 0]),
                         list(rewards2[i, :k, 0]) + list(rewards1[i, :k, 0])) for i in range(n)]
    seq = [majority_vote(list(keys2[i, :k, 1]), list(rewards2[i, :k, 1])) for i in range(n)]
    out['parallel'].append(float(np.mean(par)))
    out['sequential'].append(float(np.mean(seq)))
  return out


def fixed_repair_accuracy(episodes, params, problems: Sequence, first_attempts: Sequence[str],
                          batch_size: int) -> float:
  """Greedy second attempts after the same given (wrong) first attempts, e.g. the base's:
  correction skill compared on the same mistakes for every model."""
  texts = []
  for start, batch, m in padded_batches(list(zip(problems, first_attempts)), batch_size):
    texts += _repairs(episodes, params, [p for p, _ in batch], [a for _, a in batch], start)[:m]
  return float(np.mean(episodes.task.rewards(texts, list(problems))))
