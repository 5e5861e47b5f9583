"""Throughput of the compiled core: KV-cached sampler vs a no-cache recompute, the SCoRe
Stage II RL step and the SFT step, with model-FLOPs utilisation (MFU) against a float32
matmul peak measured in the same run.

  python bench/bench_core.py                      # 256x4 and 512x8 (WIDTHxLAYERS)
  python bench/bench_core.py --sizes 256x4 --iters 3
  python bench/bench_core.py --quick              # tiny smoke run

Model FLOPs per token (PaLM's convention, masked attention counted): training
6*(N + D*V) + 12*layers*L*(heads*H), N = non-embedding params, D*V the tied unembedding,
L the sequence length; forward only is a third of that. The RL step is policy fwd+bwd
plus the reference fwd. Sampler MFU counts every token it processes (prompt + new) at
L = prompt + new. Each number is the median of --iters timed calls after a warm-up call.
"""
import argparse
import functools
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import config_defaults
from score_jax import model as model_lib
from score_jax import optimizer
from score_jax import recipes
from score_jax import sampling
from score_jax import train

VOCAB, HEAD_DIM = 512, 64
FIRST_ID = 4  # random tokens start here: ids 0-3 are special (pad, end, begin, unknown)
NO_EOS = -1  # no sampled id equals it, so every row generates all T tokens


def timed(fn, iters):
  """(median seconds over `iters` calls, seconds of the first call incl. compile)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), first


def matmul_peak(n, iters):
  """Best-of-`iters` float32 FLOP/s of an n x n @ n x n matmul."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, a))
  best = np.inf
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def make_model(width, layers):
  cfg = model_lib.ModelConfig(vocab_size=VOCAB, embed_dim=width, hidden_dim=4 * width,
                              num_layers=layers, num_heads=max(width // HEAD_DIM, 1),
                              num_kv_heads=1, head_dim=HEAD_DIM)
  model = model_lib.Transformer(cfg)
  valid = jnp.ones((1, 8), bool)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                            model_lib.positions_from_valid(valid),
                            model_lib.causal_attention_mask(valid))['params']
  # Numpy fill: jax.random initialisers would cost a compile per shape.
  rng = np.random.default_rng(0)
  params_np = jax.tree.map(
      lambda x: 0.02 * rng.standard_normal(x.shape, np.float32), abstract)
  return model, params_np


def flops_per_token(cfg, params, seq_len, passes):
  """passes = 2 (forward) or 6 (forward + backward)."""
  n = sum(x.size for x in jax.tree.leaves(params)) - cfg.vocab_size * cfg.embed_dim
  dense = n + cfg.embed_dim * cfg.vocab_size
  attn = 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return passes * (dense + attn), n


def random_prompts(rng, B, P):
  """Left-padded random prompts of P/2..P tokens (ids >= 4: no special tokens)."""
  lengths = rng.integers(P // 2, P + 1, size=B)
  valid = np.arange(P)[None, :] >= (P - lengths)[:, None]
  tokens = np.where(valid, rng.integers(FIRST_ID, VOCAB, size=(B, P)), 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(valid)


def rl_batch(rng, B, L):
  """[prompt | y1 | instr | y2] with ragged prompt / answers, like episode_sequence."""
  P, I = L // 4, L // 16
  T = (L - P - I) // 2
  T2 = L - P - I - T
  _, prompt_valid = random_prompts(rng, B, P)
  parts_v, parts_t = [np.asarray(prompt_valid)], [np.zeros((B, P), np.int32)]
  for turn, width in ((1, T), (0, I), (2, T2)):
    n = rng.integers(1, width + 1, size=B) if turn else np.full(B, width)
    v = np.arange(width)[None, :] < n[:, None]
    parts_v.append(v)
    parts_t.append(np.where(v, turn, 0).astype(np.int32))
  valid = np.concatenate(parts_v, 1)
  toks = np.where(valid, rng.integers(FIRST_ID, VOCAB, size=(B, L)), 0).astype(np.int32)
  return dict(tokens=jnp.asarray(toks), valid=jnp.asarray(valid),
              turn=jnp.asarray(np.concatenate(parts_t, 1)),
              rewards=jnp.asarray(rng.integers(0, 2, (B, 2)).astype(np.float32)))


def bench_sampler(model, params, a, peak, rng):
  B, P, T = a.batch, a.prompt_len, a.new_tokens
  cfg = model.config
  prompt, prompt_valid = random_prompts(rng, B, P)
  variables = {'params': params}
  fwd_flops, _ = flops_per_token(cfg, params, P + T, passes=2)

  @jax.jit
  def cached(variables, prompt, prompt_valid, key, sample_params):
    state = sampling.start(model, variables, prompt, prompt_valid, cache_size=P + T)
    return sampling.decode(model, variables, state, key, sample_params, T, (NO_EOS,))[1]

  @jax.jit
  def recompute(variables, prompt, prompt_valid, key, sample_params):
    """Full forward over the fixed [B, P+T] buffer each step; unembeds only the last slot."""
    tokens = jnp.concatenate([prompt, jnp.zeros((B, T), jnp.int32)], 1)
    valid = jnp.concatenate([prompt_valid, jnp.zeros((B, T), bool)], 1)

    def step(t, carry):
      tokens, valid, key = carry
      key, step_key = jax.random.split(key)
      hidden, _ = model.apply(variables, tokens, model_lib.positions_from_valid(valid),
                              model_lib.causal_attention_mask(valid), return_hidden=True)
      last = jax.lax.dynamic_slice_in_dim(hidden, P + t - 1, 1, axis=1)
      logits = model.apply(variables, last, method=model.logits)[:, 0]
      token = sampling.sample_token(logits, step_key, sample_params)
      tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, P + t))
      valid = jax.lax.dynamic_update_slice(valid, jnp.ones((B, 1), bool), (0, P + t))
      return tokens, valid, key
    return jax.lax.fori_loop(0, T, step, (tokens, valid, key))[0][:, P:]

  args = (variables, prompt, prompt_valid, jax.random.key(0))
  results = {}
  for name, temp in (('greedy', 0.0), ('temp 1.0', 1.0)):
    sp = sampling.SampleParams.create(temperature=temp)
    sec, first = timed(lambda: cached(*args, sp), a.iters)
    sample = cached(*args, sp)
    n_new = int(sample.lengths_B.sum())
    results[name] = (sec, sample)
    mfu = fwd_flops * B * (P + T) / sec / peak
    print(f'  sampler {name:8s}: {n_new} new tokens ({B}x{T} asked) in {sec * 1e3:8.1f} ms'
          f' -> {n_new / sec:10,.0f} new tok/s  MFU {100 * mfu:5.1f}%  (1st call {first:.1f} s)')
  greedy = sampling.SampleParams.create()
  sec, first = timed(lambda: recompute(*args, greedy), a.baseline_iters)
  agree = np.mean(np.asarray(recompute(*args, greedy)) ==
                  np.asarray(results['greedy'][1].tokens_BxT))
  print(f'  no-cache greedy : {B * T} new tokens in {sec * 1e3:8.1f} ms -> '
        f'{B * T / sec:10,.0f} new tok/s  (1st call {first:.1f} s)')
  print(f'  cached speed-up : {sec / results["greedy"][0]:.1f}x '
        f'(greedy tokens agree with the cached sampler: {100 * agree:.1f}%)')


def bench_train(model, params_np, a, peak, rng):
  B, L = a.batch, a.train_len
  cfg = model.config
  batch = rl_batch(rng, B, L)
  tx = optimizer.make_optimizer(1e-4, 1.0)
  fwd, _ = flops_per_token(cfg, params_np, L, passes=2)
  fwd_bwd, _ = flops_per_token(cfg, params_np, L, passes=6)
  config = config_defaults.get_config()  # configs/demo.py's Stage II
  loss_cfg = recipes.resolve(config)[2].objective
  ref = jax.tree.map(jnp.array, params_np)
  steps = {
      'rl_step (Stage II)': (jax.jit(functools.partial(
          train.rl_step, model, tx, a.chunk, loss_cfg), donate_argnums=0), (ref,),
          fwd_bwd + fwd),
      'sft_step': (jax.jit(functools.partial(train.sft_step, model, tx, a.chunk, ()),
                           donate_argnums=0), (None,), fwd_bwd),
  }
  for name, (step, extra, flops) in steps.items():
    params = jax.tree.map(jnp.array, params_np)  # copies: the state is donated
    box = [train.TrainState(jnp.int32(0), params, tx.init(params))]

    def call():
      box[0], metrics = step(box[0], *extra, batch)
      return metrics['loss']
    sec, first = timed(call, a.iters)
    print(f'  {name:18s}: {B}x{L} tokens in {sec * 1e3:8.1f} ms -> {B * L / sec:10,.0f} tok/s'
          f'  MFU {100 * flops * B * L / sec / peak:5.1f}%  (1st call {first:.1f} s)')


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='256x4,512x8', help='comma-separated WIDTHxLAYERS')
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--baseline_iters', type=int, default=3, help='no-cache baseline (slow)')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--train_len', type=int, default=256)
  p.add_argument('--chunk', type=int, default=64, help='log-prob chunk (rl.logprob_chunk)')
  p.add_argument('--peak_n', type=int, default=2048)
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  a = p.parse_args(argv)
  if a.quick:
    a.sizes, a.iters, a.baseline_iters, a.batch = '128x2', 2, 1, 8
    a.prompt_len, a.new_tokens, a.train_len, a.chunk, a.peak_n = 16, 16, 64, 32, 512

  peak = matmul_peak(a.peak_n, 5)
  print(f'float32 matmul peak ({a.peak_n}^3, best of 5): {peak / 1e9:,.1f} GFLOP/s')
  for size in a.sizes.split(','):
    width, layers = map(int, size.split('x'))
    model, params_np = make_model(width, layers)
    _, n = flops_per_token(model.config, params_np, 0, 2)
    c = model.config
    print(f'\n== {width} x {layers} layers: vocab {c.vocab_size}, heads {c.num_heads}/'
          f'{c.num_kv_heads} kv x {c.head_dim}, hidden {c.hidden_dim}; '
          f'{n / 1e6:.2f}M non-embedding params')
    rng = np.random.default_rng(0)
    bench_sampler(model, jax.tree.map(jnp.array, params_np), a, peak, rng)
    bench_train(model, params_np, a, peak, rng)

  dev = jax.devices()[0]
  print(f'\ncommand: {shlex.join(["python"] + sys.argv)}')
  print(f'jax {jax.__version__}; {jax.device_count()} x {dev.platform} ({dev.device_kind})')


if __name__ == '__main__':
  main(sys.argv[1:])
