"""Self-correction metrics (SCORE.md): Acc@t1, Acc@t2, Δ, Δi→c, Δc→i, edit-distance ratio.

Pure NumPy and Matplotlib; the rollout-driving evaluation goes at the end of this module.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------
# Metrics.


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance (unit insert / delete / substitute) between two sequences.

  Elements may be any hashables (token ids, characters). Myers' bit-parallel algorithm
  in Hyyrö's formulation: one column of the DP table is a pair of bit vectors (Python
  ints), so a pair of 40-token responses costs ~40 integer steps rather than 1600 cells.
  """
  a = a.tolist() if isinstance(a, np.ndarray) else a
  b = b.tolist() if isinstance(b, np.ndarray) else b
  if len(a) < len(b):
    a, b = b, a  # Bit vectors over the shorter sequence.
  m = len(b)
  if m == 0:
    return len(a)
  peq: dict = {}  # element -> bit mask of its positions in b
  for i, x in enumerate(b):
    peq[x] = peq.get(x, 0) | (1 << i)
  mask, high = (1 << m) - 1, 1 << (m - 1)
  pv, mv, score = mask, 0, m  # vertical +1 / -1 deltas of the current column; D[m]
  for x in a:
    eq = peq.get(x, 0)
    xv = eq | mv
    xh = (((eq & pv) + pv) ^ pv) | eq
    ph = mv | (~(xh | pv) & mask)
    mh = pv & xh
    if ph & high:
      score += 1
    elif mh & high:
      score -= 1
    ph = ((ph << 1) | 1) & mask  # Shift in +1: D[0][j] = j (global alignment).
    mh = (mh << 1) & mask
    pv = mh | (~(xv | ph) & mask)
    mv = ph & xv
  return score


def edit_distance_ratio(a: Sequence, b: Sequence) -> float:
  """edit_distance / (len(a) + len(b)), in [0, 1]; 0.0 when both are empty."""
  total = len(a) + len(b)
  return edit_distance(a, b) / total if total else 0.0


def self_correction_metrics(r1: Sequence[float], r2: Sequence[float],
                            y1_tokens: Sequence[Sequence[int]],
                            y2_tokens: Sequence[Sequence[int]],
                            truncated1: Sequence[bool],
                            truncated2: Sequence[bool]) -> dict[str, float]:
  """The SCORE.md metrics over n two-turn episodes; all fractions of the n problems.

  r1, r2: binary rewards per problem. y*_tokens: each response's tokens (the caller
  decides whether EOS counts; be consistent). truncated*: no EOS within the budget.
  """
  r1 = np.asarray(r1, np.float64) > 0.5
  r2 = np.asarray(r2, np.float64) > 0.5
  n = len(r1)
  if n == 0:
    raise ValueError('self_correction_metrics needs at least one episode')
  lengths = {len(r2), len(y1_tokens), len(y2_tokens), len(truncated1), len(truncated2)}
  if lengths != {n}:
    raise ValueError(f'inputs disagree on the number of episodes: {sorted(lengths | {n})}')
  ratios = np.array([edit_distance_ratio(a, b) for a, b in zip(y1_tokens, y2_tokens)])
  return {
      'acc_t1': float(r1.mean()),
      'acc_t2': float(r2.mean()),
      'delta': float(r2.mean() - r1.mean()),
      'delta_i2c': float((~r1 & r2).mean()),
      'delta_c2i': float((r1 & ~r2).mean()),
      'edit_ratio_mean': float(ratios.mean()),
      'edit_ratio_zero_share': float((ratios == 0).mean()),
      'truncated_t1': float(np.mean(np.asarray(truncated1, bool))),
      'truncated_t2': float(np.mean(np.asarray(truncated2, bool))),
      'n': n,
  }


# ---------------------------------------------------------------------------------------
# Reporting.

# (header, metric key, format); fractions are shown as percentages.
_COLUMNS = (
    ('Acc@t1', 'acc_t1', '{:.1f}'),
    ('Acc@t2', 'acc_t2', '{:.1f}'),
    ('Δ', 'delta', '{:+.1f}'),
    ('Δi→c', 'delta_i2c', '{:.1f}'),
    ('Δc→i', 'delta_c2i', '{:.1f}'),
    ('edit', 'edit_ratio_mean', '{:.3f}'),
    ('edit=0', 'edit_ratio_zero_share', '{:.1f}'),
    ('trunc1', 'truncated_t1', '{:.1f}'),
    ('trunc2', 'truncated_t2', '{:.1f}'),
    ('n', 'n', '{:d}'),
)
# Shown only when some model has them.
_OPTIONAL_COLUMNS = (('MBPP-R', 'repair_acc', '{:.1f}'),)  # code tasks with eval.repair_path
_PERCENT = {'acc_t1', 'acc_t2', 'delta', 'delta_i2c', 'delta_c2i', 'edit_ratio_zero_share',
            'truncated_t1', 'truncated_t2', 'repair_acc'}


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Fixed-width table, one row per model; percentages except the edit ratio and n."""
  def cell(key, fmt, value):
    if value is None:
      return '-'
    return fmt.format(int(value) if key == 'n' else
                      100 * value if key in _PERCENT else value)

  columns = _COLUMNS + tuple(c for c in _OPTIONAL_COLUMNS
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
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  bars = (('Acc@t1', 'acc_t1'), ('Acc@t2', 'acc_t2'), ('Δi→c', 'delta_i2c'),
          ('Δc→i', 'delta_c2i'))
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


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """One JSON object per line (NumPy values allowed), written atomically."""
  def write(p):
    with open(p, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + '\n')

  path, tmp = _atomic_path(path)
  _replace(tmp, path, write)


# ---------------------------------------------------------------------------------------
# Evaluation driven by rollouts (added with the trainer).

def padded_batches(items: Sequence, batch_size: int):
  """(start, batch, n): consecutive batches of `batch_size`, the last padded with repeats
  of its final item so every compiled call has one shape; only the first n are real."""
  for start in range(0, len(items), batch_size):
    batch = list(items[start:start + batch_size])
    n = len(batch)
    yield start, batch + [batch[-1]] * (batch_size - n), n


def evaluate_policy(rollout_fn: Callable, problems: Sequence, batch_size: int,
                    transcripts_path: str | os.PathLike, num_transcripts: int) -> dict:
  """Self-correction metrics over `problems`, batch by batch, plus sample transcripts.

  `rollout_fn(problems, rng) -> (episode, scored)` (scored as `data.score_episode`). The
  last batch is padded with repeats so every call has the same shape (no recompile).
  """
  import jax  # Kept local: the metric functions above are NumPy-only.
  r1, r2, y1, y2, t1, t2, rows = [], [], [], [], [], [], []
  for start, batch, n in padded_batches(problems, batch_size):
    _, s = rollout_fn(batch, jax.random.key(start))
    r1 += list(s['r1'][:n]); r2 += list(s['r2'][:n])
    y1 += s['tokens1'][:n]; y2 += s['tokens2'][:n]
    t1 += list(s['truncated1'][:n]); t2 += list(s['truncated2'][:n])
    for i in range(min(n, num_transcripts - len(rows))):
      p = batch[i]
      rows.append(dict(id=p.id, problem=p.prompt, answer=p.answer, y1=s['text1'][i],
                       y2=s['text2'][i], r1=s['r1'][i], r2=s['r2'][i],
                       edit_ratio=edit_distance_ratio(s['tokens1'][i], s['tokens2'][i])))
  write_jsonl(transcripts_path, rows)
  return self_correction_metrics(r1, r2, y1, y2, t1, t2)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """One JSON document (NumPy values allowed), written atomically."""
  def write(p):
    with open(p, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2, default=_json_default)

  path, tmp = _atomic_path(path)
  _replace(tmp, path, write)
