"""The side-by-side benchmarks' smoke runs: bench_peers keeps working and the model it times
in transformers is the one it times here (same greedy tokens); bench_profile's decode
bound times the products it claims to, in XLA and torch alike; bench_overlap samples the
same episodes both ways; bench_spans samples the same tokens at every number of spans;
bench_loop trains the same params whether or not the host waits for each update."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'bench'))
import bench_loop  # noqa: E402
import bench_overlap  # noqa: E402
import bench_peers  # noqa: E402
import bench_profile  # noqa: E402
import bench_spans  # noqa: E402
from score_jax import model as model_lib  # noqa: E402
from score_jax import train  # noqa: E402


def test_bench_peers_quick_times_both_on_the_same_network():
  results = bench_peers.main(['--quick'])['tiny']
  # Exported by the export path and loaded by transformers: the same network, so the
  # same greedy continuation of every prompt (a tiny model far from ties).
  assert results['greedy agreement'] == 1.0
  for name in ('sampler greedy', 'sampler temp 1.0', 'rl_step', 'score step', 'ragged',
               'ragged queue/generate', 'ragged queue/generate 2 turns'):
    assert results[name] > 0  # time ratios HF / ours
  assert 0 < results['ragged useful share'] < 1


def test_decode_bound_counts_and_computes_the_same_products_in_both():
  cfg = model_lib.ModelConfig(**bench_peers.SIZES['small'])
  B, S = 8, 24
  w = bench_profile.chain_weights(cfg, S, B, np.random.default_rng(0))
  chain = functools.partial(bench_profile.decode_chain, matmul=jnp.matmul, einsum=jnp.einsum)
  compiled = jax.jit(chain).lower(jax.tree.map(jnp.asarray, w)).compile()
  # XLA's own count (products plus the few additions between them) against ours.
  flops = compiled.cost_analysis()
  flops = (flops if isinstance(flops, dict) else flops[0])['flops']
  assert abs(flops / bench_profile.chain_flops(cfg, S, B) - 1) < 0.01
  ours = np.asarray(compiled(jax.tree.map(jnp.asarray, w)))
  theirs = bench_profile.decode_chain(jax.tree.map(torch.from_numpy, w), torch.matmul,
                                      torch.einsum).numpy()
  assert ours.shape == (B, cfg.vocab_size)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bench_profile_quick_times_every_part():
  results = bench_profile.main(['--quick'])['tiny']
  assert results['decode_ours'] > 0 and results['decode_bound'] > 0
  for name, (ours, theirs) in results['train'].items():
    assert ours > 0 and (theirs is None or theirs > 0), name


def test_bench_spans_quick_runs_each_number_of_spans():
  out = bench_spans.main(['--quick', '--spans', '1,3'])  # exits if the tokens differ
  assert [r['spans'] for r in out] == [1, 3] and all(r['seconds'] > 0 for r in out)


def test_bench_loop_quick_trains_the_same_params_both_ways():
  periods = bench_loop.main(['--quick'])  # exits if the params differ
  assert len(periods[False]) == len(periods[True]) == 1
  assert all(p > 0 for p in periods[False] + periods[True])
  assert train.host_waits_for_updates()  # restored after the benchmark


def test_bench_overlap_quick_scores_the_same_episodes_both_ways():
  out = bench_overlap.main(['--quick'])
  assert out['same'] and out['after'] > 0 and out['overlapped'] > 0
