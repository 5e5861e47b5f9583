"""Scoring in the shadow of sampling: one RL step's rollout with a slow verifier, scored
after all of it is sampled (`score(sample(...))`) or chunk by chunk as the device finishes
each chunk (`score_chunks(sample_chunks(...))`, what the trainer does).

  python bench/bench_overlap.py                       # 256 x 4, 256 episodes in chunks of 64
  python bench/bench_overlap.py --verifier_ms 0       # the overhead of chunking alone
  python bench/bench_overlap.py --quick               # tiny smoke run

The verifier sleeps `--verifier_ms` per attempt: it stands in for a sandbox or a remote
grader whose work runs on host cores (or machines) that the sampler does not use. On
this CPU the sampler's device *is* the host's cores, so a verifier that computes (the
MBPP sandbox) competes with it here; on a TPU or GPU host it does not. Both ways sample
the same episodes (the script checks it); the figure is the rollout's wall time.
"""
import argparse
import shlex
import sys
import time

import jax
import numpy as np

import bench_core  # bench/ is on sys.path when run as a script
from score_jax import episodes
from score_jax import sampling
from score_jax import sharding
from score_jax.tasks import formats

PAD, EOS, BOS = 0, 1, 2


class Tokens:
  """Prompts are written as ids already: 'id id id'."""
  pad_id, eos_id, bos_id = PAD, EOS, BOS
  encode = staticmethod(lambda text: [int(t) for t in text.split()])
  decode = staticmethod(lambda ids: ' '.join(map(str, ids)))


class SlowVerifier:
  correction_instruction = '3 4 5'

  def __init__(self, seconds_per_attempt):
    self.seconds = seconds_per_attempt

  def prompt(self, problem):
    return problem

  def rewards(self, texts, problems):
    time.sleep(self.seconds * len(texts))
    return [float(len(t) % 2) for t in texts]


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--size', default='256x4', help='WIDTHxLAYERS')
  p.add_argument('--episodes', type=int, default=256)
  p.add_argument('--chunk', type=int, default=64, help='rollout.batch_size')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=64, help='per attempt; two attempts')
  p.add_argument('--verifier_ms', type=float, default=4.0, help='per attempt')
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  a = p.parse_args(argv)
  if a.quick:
    a.size, a.episodes, a.chunk, a.prompt_len, a.new_tokens, a.iters = '64x1', 8, 4, 8, 4, 1
  print('command: python bench/bench_overlap.py ' + shlex.join(argv), flush=True)
  width, layers = map(int, a.size.split('x'))
  model, params_np = bench_core.make_model(width, layers)
  params = jax.tree.map(jax.numpy.asarray, params_np)
  rng = np.random.default_rng(0)
  prompts = [' '.join(map(str, rng.integers(bench_core.FIRST_ID, bench_core.VOCAB,
                                            rng.integers(a.prompt_len // 2, a.prompt_len))))
             for _ in range(a.episodes)]

  class Rollout:
    max_prompt_len, max_len, slots, live_spans = a.prompt_len, a.new_tokens, 0, 1
  repl = sharding.replicated(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)))
  eps = episodes.Episodes(model, (repl, repl, repl), Tokens(), SlowVerifier(a.verifier_ms / 1e3),
                          formats.PromptFormat(turn1='{prompt}', turn2=' {instruction}'),
                          Rollout())
  eps.stop_ids = sampling.stop_set(None, (bench_core.NO_EOS,))  # every attempt runs to max_len
  sample_params = sampling.SampleParams.create(1.0)
  key = jax.random.key(0)

  def after():
    return eps.score(eps.sample(params, prompts, key, sample_params, 2, a.chunk))

  def overlapped():
    return eps.score_chunks(eps.sample_chunks(params, prompts, key, sample_params, 2, a.chunk))

  results = {}
  for name, fn in (('after', after), ('overlapped', overlapped)):
    fn()  # compile
    times = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      batch = fn()
      times.append(time.perf_counter() - t0)
    results[name] = (float(np.median(times)), batch)
  same = all(np.array_equal(getattr(results['after'][1], f), getattr(results['overlapped'][1], f))
             for f in ('tokens_TxBxL', 'rewards_BxT'))
  verifier = a.verifier_ms * 2 * a.episodes / 1e3
  t_after, t_over = results['after'][0], results['overlapped'][0]
  print(f'rollout of {a.episodes} two-attempt episodes, {a.size}, chunks of {a.chunk}, '
        f'verifier {verifier:.2f} s in all: scored after sampling {t_after:.2f} s, '
        f'chunk by chunk {t_over:.2f} s, {t_after / t_over:.2f}x (same episodes: {same})',
        flush=True)
  return dict(after=t_after, overlapped=t_over, verifier=verifier, same=same)


if __name__ == '__main__':
  main(sys.argv[1:])
