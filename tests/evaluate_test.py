"""Self-correction metrics, table, plot and JSONL output."""
import functools
import json
import os

import numpy as np
import pytest

from score_jax import evaluate as ev


def _brute_force(a, b):
  @functools.lru_cache(maxsize=None)
  def d(i, j):
    if i == 0 or j == 0:
      return i + j
    return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
  return d(len(a), len(b))


@pytest.mark.parametrize('a,b,expected', [
    ('kitten', 'sitting', 3),
    ('flaw', 'lawn', 2),
    ('', 'abc', 3),
    ('abc', '', 3),
    ('', '', 0),
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [3, 2, 1], 2),
    ([5], [6, 7], 2),
    (np.array([1, 2, 3, 4]), [2, 3, 4, 5], 2),
    (list(range(100)), list(range(1, 101)), 2),  # longer than one machine word
])
def test_edit_distance_hand_cases(a, b, expected):
  assert ev.edit_distance(a, b) == expected
  assert ev.edit_distance(b, a) == expected


def test_edit_distance_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(1500):
    a = tuple(rng.integers(0, 3, rng.integers(0, 8)).tolist())
    b = tuple(rng.integers(0, 3, rng.integers(0, 8)).tolist())
    assert ev.edit_distance(a, b) == _brute_force(a, b), (a, b)


def test_edit_distance_ratio():
  assert ev.edit_distance_ratio([], []) == 0.0
  assert ev.edit_distance_ratio([1, 2, 3], [1, 2, 4]) == pytest.approx(1 / 6)
  assert ev.edit_distance_ratio([7, 7], []) == 1.0


def _eight():
  r1 = [1, 1, 1, 0, 0, 0, 0, 1]
  r2 = [1, 0, 1, 1, 0, 1, 0, 1]
  y1 = [[1, 2, 3], [1, 2, 3], [], [5], [1, 2], [1, 2, 3, 4], [7, 7], [9]]
  y2 = [[1, 2, 3], [1, 2, 4], [], [6, 7], [2, 1], [1, 2, 3, 4], [], [9]]
  # ratios:  0,        1/6,     0,  2/3,    1/2,    0,            1,  0
  t1 = [0, 0, 0, 1, 0, 0, 0, 0]
  t2 = [0, 1, 0, 0, 1, 1, 0, 0]
  return ev.self_correction_metrics(np.stack([r1, r2], 1), [y1, y2], [t1, t2])


def test_self_correction_metrics_on_hand_case():
  m = _eight()
  expected = dict(acc_t1=4 / 8, acc_t2=5 / 8, delta=1 / 8, delta_i2c=2 / 8,
                  delta_c2i=1 / 8, edit_ratio_mean=7 / 24, edit_ratio_zero_share=4 / 8,
                  truncated_t1=1 / 8, truncated_t2=3 / 8,
                  correct_given_wrong=2 / 4)  # wrong at t1: rows 3-6; right at t2: 3, 5
  assert set(m) == set(expected) | {'n', 'edit_ratio_hist'}
  assert m['n'] == 8
  # The ratios of _eight() in 20 bins: four copies in bin 0, 1/6 in 3, 1/2 in 10,
  # 2/3 in 13, 1 in the last.
  want_hist = [0] * 20
  for b, n in ((0, 4), (3, 1), (10, 1), (13, 1), (19, 1)):
    want_hist[b] = n
  assert m['edit_ratio_hist'] == want_hist
  for k, v in expected.items():
    assert m[k] == pytest.approx(v), k


def test_three_attempts_on_hand_case():
  r = [[0, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]]
  y = [[[1], [2], [2]], [[1, 2], [1, 2], [3]], [[5], [5], [5]], [[7], [8], []]]
  attempts = [[row[t] for row in y] for t in range(3)]
  m = ev.self_correction_metrics(r, attempts, np.zeros((3, 4)))
  assert m['acc_t1'] == 0.5 and m['acc_t2'] == 0.5 and m['acc_t3'] == 0.5
  assert m['delta'] == 0 and m['delta_i2c'] == 0.25 and m['delta_c2i'] == 0.25  # first -> last
  assert m['delta_i2c_t1_t2'] == 0.25 and m['delta_c2i_t1_t2'] == 0.25
  assert m['delta_i2c_t2_t3'] == 0.25 and m['delta_c2i_t2_t3'] == 0.25
  assert m['correct_given_wrong'] == 0.5
  # edit distance / total length, per row: [1]->[2] 1/2, [1,2]->[1,2] 0, [5]->[5] 0,
  # [7]->[8] 1/2; then [2]->[2] 0, [1,2]->[3] 2/3, [5]->[5] 0, [8]->[] 1.
  want_12 = [0.5, 0.0, 0.0, 0.5]
  want_23 = [0.0, 2 / 3, 0.0, 1.0]
  assert m['edit_ratio_t1_t2'] == pytest.approx(np.mean(want_12))
  assert m['edit_ratio_t2_t3'] == pytest.approx(np.mean(want_23))
  assert m['edit_ratio_mean'] == pytest.approx(np.mean(want_12 + want_23))
  assert m['edit_ratio_zero_share'] == pytest.approx(4 / 8)
  table = ev.format_table({'m': m}).splitlines()[0].split()
  assert table[:4] == ['model', 'Acc@t1', 'Acc@t2', 'Acc@t3'] and 'Δt1t2' in table
  hist = m['edit_ratio_hist']  # 20 bins of [0, 1]; the last one includes 1
  assert len(hist) == 20 and sum(hist) == 8
  assert hist[0] == 4 and hist[10] == 2 and hist[13] == 1 and hist[19] == 1


@pytest.mark.parametrize('keys,rewards,want', [
    (['5', '7', '5'], [1, 0, 1], 1.0),       # the majority is right
    (['5', '7', '7'], [1, 0, 0], 0.0),       # the majority is wrong
    (['7', '5'], [0, 1], 0.0),               # a tie: the first answer to appear
    ([None, None, '5'], [0, 0, 1], 1.0),     # samples without an answer do not vote
    ([None, None], [0, 0], 0.0),             # no answer at all
    (['4', None, '4', '9', '9', '9'], [0, 0, 0, 1, 1, 1], 1.0),
])
def test_majority_vote_by_hand(keys, rewards, want):
  assert ev.majority_vote(keys, rewards) == want


def test_self_correction_metrics_input_errors():
  with pytest.raises(ValueError):
    ev.self_correction_metrics(np.zeros((0, 2)), [[], []], np.zeros((2, 0)))
  with pytest.raises(ValueError, match='disagree'):
    ev.self_correction_metrics([[1, 1]], [[[1]], [[1], [2]]], [[0], [0]])


def test_format_table():
  m = _eight()
  table = ev.format_table({'base': m, 'stage2': m})
  lines = table.splitlines()
  assert len(lines) == 4
  assert len({len(line) for line in lines}) == 1  # fixed width
  for header in ('Acc@t1', 'Acc@t2', 'Δ', 'Δi→c', 'Δc→i', 'edit', 'trunc1', 'trunc2', 'n'):
    assert header in lines[0]
  assert lines[2].split() == ['base', '50.0', '62.5', '+12.5', '25.0', '12.5', '0.292',
                              '50.0', '12.5', '37.5', '8']
  assert lines[3].startswith('stage2')
  assert 'MBPP-R' not in table
  # The repair column appears when a model has it; '-' for one that has not.
  table = ev.format_table({'base': m, 'stage2': dict(m, repair_acc=0.25)}).splitlines()
  assert table[0].split()[-1] == 'MBPP-R'
  assert table[2].split()[-1] == '-' and table[3].split()[-1] == '25.0'


def test_plot_table_writes_png(tmp_path):
  m = _eight()
  path = tmp_path / 'sub' / 'table.png'
  ev.plot_table({'base': m, 'stage1': m, 'stage2': m}, path)
  data = path.read_bytes()
  assert data.startswith(b'\x89PNG') and len(data) > 2000
  assert os.listdir(path.parent) == ['table.png']


def test_write_jsonl(tmp_path):
  path = tmp_path / 'rows.jsonl'
  path.write_text('old\n')
  rows = [{'id': '347+586', 'r1': np.float32(1.0), 'tokens': np.arange(3)},
          {'id': 'x', 'text': 'Δ → ok'}]
  ev.write_jsonl(path, rows)
  back = [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]
  assert back == [{'id': '347+586', 'r1': 1.0, 'tokens': [0, 1, 2]},
                  {'id': 'x', 'text': 'Δ → ok'}]
  assert os.listdir(tmp_path) == ['rows.jsonl']
  with pytest.raises(TypeError):
    ev.write_jsonl(path, [{'bad': object()}])
  assert len(path.read_text().splitlines()) == 2  # a failed write leaves the old file
  assert os.listdir(tmp_path) == ['rows.jsonl']
