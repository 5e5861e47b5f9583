"""Where a decode step's and an RL train step's time goes, ours against HF transformers',
on the same random model (bench_peers.build), in one process:

  python bench/bench_profile.py --sizes small,medium
  python bench/bench_profile.py --quick            # tiny smoke run

Decode: a step's time is (T-token generation - prefill) / T, for our `generate` and HF's
`generate`. The bound beside them is the step's matrix products alone: every projection,
the MLP, attention's two products over the cache and the unembedding, at the same shapes
(batch B, one token), chained layer by layer with nothing else, timed in XLA and in
torch. A step cannot beat its own matmuls, so `ours / bound` says how much is left to win
and `2x HF` is reachable only if HF's step is more than twice the bound.

Train: the RL step in its parts, each compiled (ours) or run (PyTorch) on its own:
reference forward (log-probs of the taken tokens), policy forward + backward of the same
log-probs (ours with its entropy pass, and without it), and the Adam update; the whole
step is bench_peers' `--parts train`. Each time is the median of --iters calls after a warm-up call.
"""
import argparse
import functools
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import bench_core  # bench/ is on sys.path when run as a script
import bench_peers
from score_jax import objective
from score_jax import optimizer
from score_jax import sampling


def chain_weights(cfg, S, B, rng):
  """Random weights of one decode step's products, and a cache of S slots (one kv head)."""
  D, F, V, N, H = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size, cfg.num_heads, cfg.head_dim
  w = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
  layers = [dict(q=w(D, N * H), kv=w(D, 2 * cfg.num_kv_heads * H), o=w(N * H, D),
                 gate_up=w(D, 2 * F), down=w(F, D)) for _ in range(cfg.num_layers)]
  return dict(layers=layers, unembed=w(D, V), k=w(B, S, H), v=w(B, S, H), x=w(B, D))


def chain_flops(cfg, S, B):
  D, F, V, N, H = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size, cfg.num_heads, cfg.head_dim
  per_layer = D * N * H + D * 2 * cfg.num_kv_heads * H + N * H * D + D * 2 * F + F * D
  return 2 * B * (cfg.num_layers * (per_layer + 2 * N * S * H) + D * V)


def decode_chain(w, matmul, einsum):
  """The step's products in dependency order, joined by additions only (no norms,
  rotary, softmax or sampling): [B, D] -> logits. Works on jnp or torch arrays."""
  x = w['x']
  B = x.shape[0]
  for lw in w['layers']:
    q = matmul(x, lw['q'])
    kv = matmul(x, lw['kv'])
    q = q.reshape(B, -1, w['k'].shape[-1])
    attn = einsum('bns,bsh->bnh', einsum('bnh,bsh->bns', q, w['k']), w['v'])
    # kv joins the stream only so that its product is not dropped as unused.
    x = x + matmul(attn.reshape(B, -1), lw['o']) + kv[:, :1]
    h = matmul(x, lw['gate_up'])
    x = x + matmul(h[:, :h.shape[1] // 2], lw['down'])
  return matmul(x, w['unembed'])


def time_chain(cfg, S, B, iters, rng):
  """(XLA seconds, torch seconds) for one decode step's products."""
  w = chain_weights(cfg, S, B, rng)
  wj = jax.tree.map(jnp.asarray, w)
  f = jax.jit(functools.partial(decode_chain, matmul=jnp.matmul, einsum=jnp.einsum))
  t_xla, _ = bench_core.timed(lambda: f(wj), iters)
  wt = jax.tree.map(torch.from_numpy, w)
  with torch.no_grad():
    t_torch, _ = bench_core.timed(
        lambda: decode_chain(wt, torch.matmul, torch.einsum).numpy(), iters)
  return t_xla, t_torch


def profile_decode(model, params, hf, a, rng):
  B, P, T = a.batch, a.prompt_len, a.new_tokens
  prompt, prompt_valid = bench_core.random_prompts(rng, B, P)
  variables, greedy = {'params': params}, sampling.SampleParams.create()

  @functools.partial(jax.jit, static_argnums=3)
  def ours(prompt, prompt_valid, key, n):
    state = sampling.start(model, variables, prompt, prompt_valid, cache_size=P + T)
    if not n:
      return state.last_logits_BxV
    return sampling.decode(model, variables, state, key, greedy, n, (-1,))[1].tokens_BxT

  ids = torch.tensor(np.asarray(prompt), dtype=torch.long)
  mask = torch.tensor(np.asarray(prompt_valid), dtype=torch.long)

  def theirs(n):
    return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, eos_token_id=None, pad_token_id=0)

  t = {}
  t['ours', 0], t['ours', T] = (bench_core.timed(lambda: ours(prompt, prompt_valid,
                                                              jax.random.key(0), n), a.iters)[0]
                                for n in (0, T))
  t['hf', 1], t['hf', T] = (bench_peers.torch_timed(lambda: theirs(n), a.iters)[0]
                            for n in (1, T))
  step_ours = (t['ours', T] - t['ours', 0]) / T
  step_hf = (t['hf', T] - t['hf', 1]) / (T - 1)
  # The cache the step attends over, on average: the prompt and half the new tokens.
  S = P + T // 2
  t_xla, t_torch = time_chain(model.config, S, B, a.iters, rng)
  bound = min(t_xla, t_torch)
  gflop = chain_flops(model.config, S, B) / 1e9
  print(f'  decode step, batch {B} (greedy; prefill excluded): score_jax {step_ours * 1e3:7.2f} ms'
        f' | HF {step_hf * 1e3:7.2f} ms | its products alone: XLA {t_xla * 1e3:7.2f} ms, '
        f'torch {t_torch * 1e3:7.2f} ms ({gflop / bound:,.1f} GFLOP/s at the faster)')
  print(f'    bound / step: score_jax {bound / step_ours:.0%}, HF {bound / step_hf:.0%}; '
        f'the most any loop could be faster than HF here: {step_hf / bound:.2f}x')
  print(f'    prefill of {B} x {P}: score_jax {t["ours", 0] * 1e3:.1f} ms')
  return dict(decode_ours=step_ours, decode_hf=step_hf, decode_bound=bound)


def profile_train(model, params, hf, a, rng):
  B, L, C = a.train_batch or a.batch, a.train_len, a.chunk
  batch = bench_core.rl_batch(rng, B, L)
  tokens, valid = batch['tokens'], batch['valid']
  answer = (batch['turn'] > 0).astype(jnp.float32)
  adv = jnp.asarray(np.asarray(batch['rewards']).sum(1) - np.asarray(batch['rewards']).sum(1).mean())

  def loss(params, with_entropy):
    logp, entropy = objective.token_logprobs(model, params, tokens, valid, C, with_entropy)
    # As in rl_step, the entropy is a metric: computed, kept (so not dropped), no gradient.
    kept = 0.0 if entropy is None else 0.0 * jax.lax.stop_gradient(entropy).sum()
    return -jnp.sum(adv[:, None] * logp * answer) / answer.sum() + kept

  tx = optimizer.make_optimizer(1e-6, 1.0)
  ref = jax.jit(lambda p: objective.token_logprobs(model, p, tokens, valid, C,
                                                   with_entropy=False)[0])
  grad = {e: jax.jit(jax.grad(functools.partial(loss, with_entropy=e))) for e in (True, False)}
  grads = grad[True](params)

  @jax.jit
  def adam(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  ours = {
      'reference forward': lambda: ref(params),
      'policy forward + backward': lambda: grad[True](params),
      '  same without the entropy pass': lambda: grad[False](params),
      'Adam update': lambda: adam(params, opt_state, grads),
  }
  ref_hf = type(hf)(hf.config).eval()
  ref_hf.load_state_dict(hf.state_dict())
  for p in ref_hf.parameters():
    p.requires_grad_(False)
  tt = torch.tensor(np.asarray(tokens), dtype=torch.long)
  tv = torch.tensor(np.asarray(valid), dtype=torch.long)
  ta = torch.tensor(np.asarray(answer))[:, 1:]
  tadv = torch.tensor(np.asarray(adv))

  def hf_logp(m):
    logits = m(tt, attention_mask=tv).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, tt[:, 1:, None])[..., 0]

  def hf_fwd_bwd():
    hf.zero_grad(set_to_none=True)
    loss = -(tadv[:, None] * hf_logp(hf) * ta).sum() / ta.sum()
    loss.backward()
    return loss.detach()

  hf.train()
  opt = torch.optim.Adam(hf.parameters(), lr=1e-6)
  hf_fwd_bwd()  # leaves gradients for the timed optimizer steps
  with torch.no_grad():
    t_ref_hf = bench_core.timed(lambda: hf_logp(ref_hf), a.iters)[0]
  theirs = {
      'reference forward': t_ref_hf,
      'policy forward + backward': bench_core.timed(hf_fwd_bwd, a.iters)[0],
      '  same without the entropy pass': None,
      'Adam update': bench_core.timed(lambda: (opt.step(), torch.zeros(()))[1], a.iters)[0],
  }
  hf.eval()
  print(f'  RL step parts, {B} x {L} tokens: score_jax ms | PyTorch ms | PyTorch / ours')
  times = {}
  for name, fn in ours.items():
    t = bench_core.timed(fn, a.iters)[0]
    times[name] = (t, theirs[name])
    hf_text = '' if theirs[name] is None else (f'{theirs[name] * 1e3:9.1f} | '
                                               f'{theirs[name] / t:5.2f}x')
    print(f'    {name:32s} {t * 1e3:9.1f} | {hf_text}')
  return times


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='small,medium')
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--train_len', type=int, default=128)
  p.add_argument('--train_batch', type=int, default=0, help='0: --batch')
  p.add_argument('--chunk', type=int, default=64, help='log-prob chunk (rl.logprob_chunk)')
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  a = p.parse_args(argv)
  if a.quick:  # 3 calls each: a decode step is a difference of two times, keep it positive
    a.sizes, a.iters, a.batch, a.prompt_len, a.new_tokens, a.train_len = 'tiny', 3, 8, 16, 16, 64
  torch.set_num_threads(os.cpu_count() or 1)
  peak = bench_core.matmul_peak(512 if a.quick else 2048, 5)
  print(f'float32 matmul peak (square, best of 5): {peak / 1e9:,.1f} GFLOP/s')
  results = {}
  for size in a.sizes.split(','):
    rng = np.random.default_rng(0)
    model, params, hf = bench_peers.build(size, rng)
    print(f'\n== {size}')
    results[size] = dict(profile_decode(model, params, hf, a, rng),
                         train=profile_train(model, params, hf, a, rng))
  print(f'\ncommand: {shlex.join(["python"] + sys.argv)}')
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
