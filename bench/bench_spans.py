"""Live-span attention: a two-attempt episode whose decode steps read the whole KV cache
(`spans` 1) against steps that read only the smallest of a few spans holding every written
slot (`sampling.live_spans`), at a long cache like configs/math.py's.

  python bench/bench_spans.py                          # 256 x 4, batch 16, 128 + 2 x 512
  python bench/bench_spans.py --spans 1,2,4,8 --iters 3
  python bench/bench_spans.py --quick                  # tiny smoke run

No attempt stops early (no stop token), so each episode writes P + 2T + I slots and the
first attempt never sees the second's: the share of empty slots a whole-cache step reads
is the largest a real run meets. Both ways sample the same tokens (checked, greedy); the
figure is new tokens per second, and the ratio against `spans` 1 in the same run.
"""
import argparse
import functools
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bench_core  # bench/ is on sys.path when run as a script
from score_jax import sampling


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--size', default='256x4', help='WIDTHxLAYERS')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--prompt_len', type=int, default=128)
  p.add_argument('--new_tokens', type=int, default=512, help='per attempt; two attempts')
  p.add_argument('--spans', default='1,4', help='comma-separated; the first is the baseline')
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  a = p.parse_args(argv)
  if a.quick:
    a.size, a.batch, a.prompt_len, a.new_tokens, a.iters = '64x2', 4, 16, 32, 1

  width, layers = map(int, a.size.split('x'))
  model, params_np = bench_core.make_model(width, layers)
  variables = {'params': jax.tree.map(jnp.array, params_np)}
  B, P, T = a.batch, a.prompt_len, a.new_tokens
  prompt, prompt_valid = bench_core.random_prompts(np.random.default_rng(0), B, P)
  instr_I = jnp.arange(bench_core.FIRST_ID, bench_core.FIRST_ID + 8, dtype=jnp.int32)
  greedy = sampling.SampleParams.create()
  cache = P + 2 * T + len(instr_I)
  print(f'{a.size}, batch {B}, prompts of {P // 2}..{P} + 2 attempts x {T} new tokens; '
        f'cache of {cache} slots')

  base, base_tokens, results = None, None, []
  for spans in map(int, a.spans.split(',')):
    run = jax.jit(functools.partial(sampling.generate, model, turns=2, max_len=T,
                                    stop_ids=(bench_core.NO_EOS,), spans=spans))
    call = lambda: run(variables, prompt, prompt_valid, jax.random.key(0), greedy,
                       instr_I=instr_I)
    t, first = bench_core.timed(call, a.iters)
    tokens = np.stack([np.asarray(s.tokens_BxT) for s in call()])
    if base_tokens is None:
      base, base_tokens = t, tokens
    same = np.array_equal(tokens, base_tokens)
    print(f'  spans {spans} {sampling.live_spans(cache, spans)}: {2 * B * T / t:,.0f} new '
          f'tok/s ({t:.2f} s; compile + first call {first:.1f} s); {base / t:.2f}x spans '
          f'{a.spans.split(",")[0]}; same tokens: {same}')
    if not same:
      raise SystemExit('live spans changed the greedy tokens')
    results.append(dict(spans=spans, seconds=t, ratio=base / t))

  dev = jax.devices()[0]
  print(f'\ncommand: {shlex.join(["python"] + sys.argv)}')
  print(f'jax {jax.__version__}; {jax.device_count()} x {dev.platform} ({dev.device_kind})')
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
