"""bench/bench_peers.py's smoke run: the side-by-side benchmark keeps working, and the model
it times in transformers is the one it times here (same greedy tokens)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'bench'))
import bench_peers  # noqa: E402


def test_bench_peers_quick_times_both_on_the_same_network():
  results = bench_peers.main(['--quick'])['tiny']
  # Exported by the export path and loaded by transformers: the same network, so the
  # same greedy continuation of every prompt (a tiny model far from ties).
  assert results['greedy agreement'] == 1.0
  for name in ('sampler greedy', 'sampler temp 1.0', 'rl_step', 'score step', 'ragged',
               'ragged queue/generate', 'ragged queue/generate 2 turns'):
    assert results[name] > 0  # time ratios HF / ours
  assert 0 < results['ragged useful share'] < 1
