"""score_jax against Hugging Face transformers on the same random model, side by side.

  pip install -e '.[bench]'
  python bench/bench_peers.py                        # small, medium, smollm2 shapes
  python bench/bench_peers.py --sizes smollm2 --iters 3
  python bench/bench_peers.py --quick                # tiny smoke run

One process builds a random model in our layout, writes it as an HF checkpoint
(`score_jax.export.export`) and loads it with
transformers (float32, SDPA attention, torch with as many threads as JAX has cores), then
times in turn:
- the sampler: our jitted KV-cached loop against HF `generate` (cached, left-padded batch,
  no EOS so both produce all T tokens), greedy and at temperature 1; the greedy tokens of
  the two are compared as a check that both run the same network;
- ragged rollouts (`bench_ragged`): a stop set sized so that most attempts stop early and
  about 5% run to T; HF and our `generate` decode each batch until its longest attempt
  stops, `sampling.generate_queue` refills finished rows; the figure is useful tok/s;
- the RL train step: our `train.rl_step` (Stage II: reference forward, policy forward and
  backward, per-token KL, Adam) against the same computation written in PyTorch;
- the whole RL step (`bench_score`): TRL's `GRPOTrainer` step (generate, reward, reference
  and policy passes, Adam) against ours (two attempts sampled in one KV cache, scored,
  laid out and trained by the Stage II `rl_step`), in trained completion tokens/s;
- a float32 matmul reference at the start and at the end (the machine is noisy: read the
  ratios, and trust a run whose two references agree).
Each time is the median of --iters calls after a warm-up call (compilation excluded).
"""
import argparse
import functools
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import bench_core  # bench/ is on sys.path when run as a script
from score_jax import config_defaults
from score_jax import episodes
from score_jax import export
from score_jax import model as model_lib
from score_jax import optimizer
from score_jax import presets
from score_jax import recipes
from score_jax import sampling
from score_jax import train
from score_jax.weights import mapping

# name -> ModelConfig fields. small / medium: bench_core's Gemma-style shapes (vocab 512);
# smollm2: SmolLM2-135M (Llama layout, grouped-query attention, vocab 49,152).
SIZES = {
    'tiny': dict(vocab_size=512, embed_dim=64, hidden_dim=256, num_layers=2, num_heads=1,
                 num_kv_heads=1, head_dim=64),
    'small': dict(vocab_size=512, embed_dim=256, hidden_dim=1024, num_layers=4, num_heads=4,
                  num_kv_heads=1, head_dim=64),
    'medium': dict(vocab_size=512, embed_dim=512, hidden_dim=2048, num_layers=8, num_heads=8,
                   num_kv_heads=1, head_dim=64),
    'smollm2': presets.get('smollm2_135m'),
}


def build(size: str, rng):
  """(our model, our params, HF model) with the same random weights."""
  cfg = model_lib.ModelConfig(**{**SIZES[size], 'dtype': 'float32', 'param_dtype': 'float32',
                                 'remat': False})
  abstract = mapping.abstract_params(cfg)
  # Norm scales around the identity (Gemma stores them as offsets from 1, Llama as is).
  one = 0.0 if cfg.norm_plus_one else 1.0
  params = jax.tree.map_with_path(
      lambda path, x: ('scale' in jax.tree_util.keystr(path)) * one
      + 0.05 * rng.standard_normal(x.shape, np.float32), abstract)
  with tempfile.TemporaryDirectory() as d:
    export.export(params, cfg, d, tokenizer_path=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation='sdpa').eval()
  return model_lib.Transformer(cfg), jax.tree.map(jnp.asarray, params), hf


def torch_timed(fn, iters):
  with torch.no_grad():
    return bench_core.timed(fn, iters)


def spread_stop_ids(sampled_BxT, long_share=0.05):
  """Stop ids 1..k for a ragged spread in which about `long_share` of attempts run to T.
  In a calibration sample drawn without stops, an attempt would have run to T exactly
  when its smallest token id is above k, so k is that minimum's (1 - long_share) quantile.
  The realised spread (another draw) is printed."""
  min_B = np.sort(np.asarray(sampled_BxT).min(axis=1))  # ids >= 1: the pad is never drawn
  return tuple(range(1, int(min_B[int(np.ceil((1 - long_share) * len(min_B))) - 1]) + 1))


def bench_sampler(model, params, hf, a, rng, out):
  B, P, T = a.batch, a.prompt_len, a.new_tokens
  prompt, prompt_valid = bench_core.random_prompts(rng, B, P)
  variables = {'params': params}

  @functools.partial(jax.jit, static_argnums=4)
  def ours(variables, prompt, prompt_valid, key, n, sample_params):
    state = sampling.start(model, variables, prompt, prompt_valid, cache_size=P + n)
    return sampling.decode(model, variables, state, key, sample_params, n, (-1,))[1]

  hf_ids = torch.tensor(np.asarray(prompt), dtype=torch.long)
  hf_mask = torch.tensor(np.asarray(prompt_valid), dtype=torch.long)

  def theirs(do_sample, n):
    return hf.generate(hf_ids, attention_mask=hf_mask, do_sample=do_sample, temperature=1.0,
                       top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                       eos_token_id=None, pad_token_id=0, suppress_tokens=[0])

  for name, temp in (('greedy', 0.0), ('temp 1.0', 1.0)):
    sp = sampling.SampleParams.create(temperature=temp)
    t_ours, _ = bench_core.timed(lambda: ours(variables, prompt, prompt_valid,
                                              jax.random.key(0), T, sp), a.iters)
    t_hf, _ = torch_timed(lambda: theirs(temp > 0, T), a.iters)
    n = B * T
    print(f'  sampler {name:8s}: score_jax {n / t_ours:9,.0f} new tok/s | HF generate '
          f'{n / t_hf:9,.0f} new tok/s | ratio {t_hf / t_ours:5.2f}x')
    out[f'sampler {name}'] = t_hf / t_ours
  with torch.no_grad():
    hf_greedy = theirs(False, T)[:, P:].numpy()
  greedy = sampling.SampleParams.create()
  our_greedy = np.asarray(ours(variables, prompt, prompt_valid, jax.random.key(0), T,
                               greedy).tokens_BxT)
  # Random weights make near-ties common; float32 sums in another order flip some of them,
  # and a row differs from its first flip on: at large sizes read the first token's share.
  out['greedy agreement'] = float(np.mean(hf_greedy == our_greedy))
  print(f'  greedy tokens identical to HF: {100 * out["greedy agreement"]:.1f}% '
        f'(first token {100 * np.mean(hf_greedy[:, 0] == our_greedy[:, 0]):.1f}%)')

  bench_ragged(model, variables, hf, a, rng, out)


def bench_ragged(model, variables, hf, a, rng, out):
  """N = 4B episodes with ragged attempts, at temperature 1: HF `generate` and our
  `generate` take them B at a time, each batch decoding until its longest attempt stops;
  `generate_queue` runs all N through B cache rows, refilling a row when its episode ends.
  The figure is useful (sampled, not pad) tokens per second; each loop counts its own."""
  B, P, T, N = a.batch, a.prompt_len, a.new_tokens, 4 * a.batch
  prompt, prompt_valid = bench_core.random_prompts(rng, N, P)
  sp = sampling.SampleParams.create(temperature=1.0)
  calibration = jax.jit(functools.partial(sampling.generate, model, turns=1, max_len=T,
                                          stop_ids=()))
  stops = spread_stop_ids(calibration(variables, prompt, prompt_valid, jax.random.key(1),
                                      sp)[0].tokens_BxT)
  instr_I = jnp.asarray(rng.integers(4, bench_core.VOCAB, size=8), jnp.int32)
  common = dict(max_len=T, stop_ids=stops)

  @functools.partial(jax.jit, static_argnums=4)
  def batched(variables, prompt, prompt_valid, key, turns):
    keys = jax.random.split(key, N // B)
    return [sampling.generate(model, variables, prompt[i * B:(i + 1) * B],
                              prompt_valid[i * B:(i + 1) * B], keys[i], sp, turns=turns,
                              instr_I=instr_I if turns > 1 else None, **common)
            for i in range(N // B)]

  @functools.partial(jax.jit, static_argnums=4)
  def queued(variables, prompt, prompt_valid, key, turns):
    return [sampling.generate_queue(model, variables, prompt, prompt_valid, key, sp, slots=B,
                                    turns=turns, instr_I=instr_I if turns > 1 else None,
                                    **common)]

  def useful(parts):
    return int(sum(np.asarray(s.lengths_B).sum() for samples in parts for s in samples))

  hf_ids = torch.tensor(np.asarray(prompt), dtype=torch.long)
  hf_mask = torch.tensor(np.asarray(prompt_valid), dtype=torch.long)

  def theirs():
    return [hf.generate(hf_ids[i * B:(i + 1) * B], attention_mask=hf_mask[i * B:(i + 1) * B],
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T,
                        eos_token_id=list(stops), pad_token_id=0, suppress_tokens=[0])
            for i in range(N // B)]

  # Both loops prefill the same prompts; on a CPU a prompt token costs about what a decode
  # token does, so the prefill's share of `generate` bounds what the queue can gain.
  prefill = jax.jit(lambda v, p, m: sampling.start(model, v, p, m, P + T).last_logits_BxV)
  t_prefill, _ = bench_core.timed(lambda: prefill(variables, prompt[:B], prompt_valid[:B]),
                                  a.iters)
  def timed_keeping(fn):
    """(median seconds, the last call's output): the counts come from a timed call."""
    last = {}
    def call():
      last['out'] = fn()
      return last['out']
    t, _ = bench_core.timed(call, a.iters)
    return t, last['out']

  rates, shares = {}, {}
  for turns in (1, 2):
    for name, fn in (('generate', batched), ('queue', queued)):
      t, parts = timed_keeping(lambda: fn(variables, prompt, prompt_valid, jax.random.key(0),
                                          turns))
      n = useful(parts)
      shares[name, turns] = n / (N * turns * T)
      long = np.mean([np.asarray(s.lengths_B == T) for samples in parts for s in samples])
      rates[name, turns] = n / t
      print(f'  ragged {turns} turn(s), {N} episodes, {B} rows, {len(stops)} stop ids: '
            f'{name:8s} {n / t:9,.0f} useful tok/s ({shares[name, turns]:.0%} of the '
            f'{N * turns} x {T} attempt slots; {long:.0%} of attempts ran to {T})')
      if (name, turns) == ('generate', 1):
        print(f'  ragged: the {N // B} prefills of {B} x {P} prompt tokens take '
              f'{N // B * t_prefill:.2f} s, {N // B * t_prefill / t:.0%} of generate\'s time')
  with torch.no_grad():
    t_hf, hf_parts = timed_keeping(theirs)
  n_hf = int(sum((o[:, P:] != 0).sum() for o in hf_parts))
  print(f'  ragged 1 turn: HF generate {n_hf / t_hf:9,.0f} useful tok/s | queue / generate '
        f'{rates["queue", 1] / rates["generate", 1]:5.2f}x (2 turns '
        f'{rates["queue", 2] / rates["generate", 2]:5.2f}x) | queue / HF '
        f'{rates["queue", 1] / (n_hf / t_hf):5.2f}x')
  out['ragged useful share'] = shares['generate', 1]
  out['ragged queue/generate'] = rates['queue', 1] / rates['generate', 1]
  out['ragged queue/generate 2 turns'] = rates['queue', 2] / rates['generate', 2]
  out['ragged'] = rates['queue', 1] / (n_hf / t_hf)


def hf_rl_step(hf, ref, opt, batch, beta=0.01):
  """The RL step in PyTorch: reference and policy log-probs of the taken tokens, the
  REINFORCE term with per-episode advantages on the answer tokens, a per-token KL to the
  reference, backward, clip, Adam (our Stage II loss, without its per-turn bookkeeping)."""
  tokens, valid = batch['tokens'], batch['valid']
  mask = batch['answer'][:, 1:]
  with torch.no_grad():
    ref_logp = torch.log_softmax(ref(tokens, attention_mask=valid).logits[:, :-1], -1)
    ref_logp = ref_logp.gather(-1, tokens[:, 1:, None])[..., 0]
  logits = hf(tokens, attention_mask=valid).logits[:, :-1]
  logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
  kl = logp - ref_logp
  per_token = -batch['adv'][:, None] * logp + beta * kl
  loss = (per_token * mask).sum() / mask.sum()
  loss.backward()
  torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss


def bench_train(model, params, hf, a, rng, out):
  B, L = a.train_batch or a.batch, a.train_len
  batch = bench_core.rl_batch(rng, B, L)
  tx = optimizer.make_optimizer(1e-6, 1.0)
  loss_cfg = recipes.resolve(config_defaults.get_config())[2].objective  # Stage II
  step = jax.jit(functools.partial(train.rl_step, model, tx, a.chunk, loss_cfg),
                 donate_argnums=0)
  ref = jax.tree.map(jnp.copy, params)
  box = [train.TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))]

  def ours():
    box[0], m = step(box[0], ref, batch)
    return m['loss']
  t_ours, _ = bench_core.timed(ours, a.iters)

  ref_hf = type(hf)(hf.config).eval()
  ref_hf.load_state_dict(hf.state_dict())
  for p in ref_hf.parameters():
    p.requires_grad_(False)
  hf.train()
  opt = torch.optim.Adam(hf.parameters(), lr=1e-6)
  turn = np.asarray(batch['turn'])
  rewards = np.asarray(batch['rewards'])
  tb = dict(tokens=torch.tensor(np.asarray(batch['tokens']), dtype=torch.long),
            valid=torch.tensor(np.asarray(batch['valid']), dtype=torch.long),
            answer=torch.tensor(turn > 0, dtype=torch.float32),
            adv=torch.tensor(rewards.sum(1) - rewards.sum(1).mean(), dtype=torch.float32))
  t_hf, _ = bench_core.timed(lambda: hf_rl_step(hf, ref_hf, opt, tb).detach(), a.iters)
  hf.eval()
  n = B * L
  print(f'  rl_step (Stage II): {B}x{L} tokens in {t_ours * 1e3:8.1f} ms ({n / t_ours:8,.0f}'
        f' tok/s) | PyTorch {t_hf * 1e3:8.1f} ms ({n / t_hf:8,.0f} tok/s) | ratio '
        f'{t_hf / t_ours:5.2f}x')
  out['rl_step'] = t_hf / t_ours


def low_id_share(attempt_ids, vocab):
  """The benchmark's reward, the same for both: the share of an attempt's tokens in the
  lower half of the vocabulary (cheap, so the step's time is the model's)."""
  return float(np.mean(np.asarray(attempt_ids) < vocab // 2))


def trl_tokenizer(vocab):
  """A word-level HF tokenizer over ids 't4' ... 't{vocab-1}': TRL's trainer takes text
  prompts, and this makes them exactly our random token ids."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  words = {'<pad>': 0, '<eos>': 1, '<bos>': 2, '<unk>': 3,
           **{f't{i}': i for i in range(bench_core.FIRST_ID, vocab)}}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='<unk>'))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>',
                                              eos_token='<eos>', unk_token='<unk>')


def bench_score(model, params, a, rng, out):
  """One whole RL step, sampling to update, in trained completion tokens per second.
  TRL: GRPO, a batch of `--batch` completions (`--batch // G` prompts x G = 4), one attempt
  of `--new_tokens`, beta 0.01 (a reference model), one update per generation batch.
  Ours: the same episodes as SCoRe's Stage II, two attempts of `--new_tokens` with the
  instruction between them, RLOO groups of 4. Neither stops early (no stop token is
  drawable), so every attempt is `--new_tokens` long and both train every sampled token."""
  import datasets  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  B, P, T, G, V = a.batch, a.prompt_len, a.new_tokens, 4, model.config.vocab_size
  prompt, prompt_valid = bench_core.random_prompts(rng, B // G, P)
  prompt, prompt_valid = (jnp.repeat(x, G, axis=0) for x in (prompt, prompt_valid))
  instr_I = jnp.asarray(rng.integers(bench_core.FIRST_ID, V, size=8), jnp.int32)
  sp = sampling.SampleParams.create(temperature=1.0)
  sample = jax.jit(functools.partial(sampling.generate, model, turns=2, max_len=T, stop_ids=(),
                                     instr_I=instr_I))
  tx = optimizer.make_optimizer(1e-6, 1.0)
  loss_cfg = recipes.resolve(config_defaults.get_config())[2].objective  # Stage II
  step = jax.jit(functools.partial(train.rl_step, model, tx, a.chunk, loss_cfg),
                 donate_argnums=0)
  ref = jax.tree.map(jnp.copy, params)
  box = [train.TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params)), 0]
  trained = []

  def ours():
    box[1] += 1
    samples = sample({'params': box[0].params}, prompt, prompt_valid, jax.random.key(box[1]), sp)
    batch = episodes.Batch(
        problems=[None] * B, prompt_BxP=np.asarray(prompt), prompt_valid_BxP=np.asarray(prompt_valid),
        tokens_TxBxL=np.stack([np.asarray(s.tokens_BxT) for s in samples]),
        valid_TxBxL=np.stack([np.asarray(s.valid_BxT) for s in samples]),
        truncated_TxB=np.stack([np.asarray(s.truncated_B) for s in samples]),
        onpolicy_BxT=np.ones((B, 2), bool))
    batch.rewards_BxT = np.asarray([[low_id_share(x, V) for x in batch.attempt_tokens(t)]
                                    for t in range(2)], np.float32).T
    layout = episodes.loss_layout(batch, np.asarray(instr_I))
    del layout['onpolicy']  # all on-policy
    trained.append(int((layout['turn'] > 0).sum()))
    box[0], m = step(box[0], ref, {k: jnp.asarray(v) for k, v in layout.items()})
    return m['loss']
  t_ours, _ = bench_core.timed(ours, a.iters)

  class Clock(transformers.TrainerCallback):
    def __init__(self):
      self.ends = []

    def on_step_end(self, *unused_args, **unused_kwargs):
      self.ends.append(time.perf_counter())

  texts = [' '.join(f't{i}' for i in row[v]) for row, v in
           zip(np.asarray(prompt)[::G], np.asarray(prompt_valid)[::G])]
  clock = Clock()
  with tempfile.TemporaryDirectory() as d:
    export.export(params, model.config, os.path.join(d, 'model'), tokenizer_path=None)
    args = trl.GRPOConfig(
        output_dir=d, per_device_train_batch_size=B, num_generations=G,
        max_completion_length=T, beta=0.01, learning_rate=1e-6, max_steps=a.iters + 1,
        temperature=1.0, top_k=0, top_p=1.0, use_cpu=True, bf16=False, report_to='none',
        save_strategy='no', disable_tqdm=True, shuffle_dataset=False,
        # As in our sampler: pad and end-of-sequence are never drawn, so all T tokens come.
        generation_kwargs=dict(suppress_tokens=[0, 1]),
        model_init_kwargs=dict(dtype=torch.float32, attn_implementation='sdpa'))
    trainer = trl.GRPOTrainer(
        model=os.path.join(d, 'model'), args=args, processing_class=trl_tokenizer(V),
        reward_funcs=lambda completion_ids, **_: [low_id_share(c, V) for c in completion_ids],
        train_dataset=datasets.Dataset.from_dict({'prompt': texts * (a.iters + 1)}),
        callbacks=[clock])
    trainer.train()
  t_trl = float(np.median(np.diff(clock.ends)))  # step ends: the first step's setup excluded
  lengths = [h['completions/mean_length'] for h in trainer.state.log_history
             if 'completions/mean_length' in h]
  n_trl, n_ours = B * float(np.mean(lengths)), float(np.mean(trained))
  print(f'  full RL step: score_jax (SCoRe Stage II, {B} episodes x 2 attempts) {n_ours:,.0f} '
        f'trained tokens in {t_ours:.2f} s ({n_ours / t_ours:8,.0f} tok/s) | TRL GRPOTrainer '
        f'{trl.__version__} ({B} x 1 attempt) {n_trl:,.0f} in {t_trl:.2f} s ({n_trl / t_trl:8,.0f} '
        f'tok/s) | ratio {n_ours / t_ours / (n_trl / t_trl):5.2f}x')
  out['score step'] = n_ours / t_ours / (n_trl / t_trl)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='small,medium,smollm2', help=f'of {sorted(SIZES)}')
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--train_len', type=int, default=128)
  p.add_argument('--train_batch', type=int, default=0,
                 help='0: --batch. SmolLM2 at 64 x 128 without remat needs > 24 GB.')
  p.add_argument('--parts', default='sampler,train,score')
  p.add_argument('--chunk', type=int, default=64, help='log-prob chunk (rl.logprob_chunk)')
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  a = p.parse_args(argv)
  if a.quick:
    a.sizes, a.iters, a.batch, a.prompt_len, a.new_tokens, a.train_len = 'tiny', 1, 8, 16, 16, 64
  torch.set_num_threads(os.cpu_count() or 1)
  peak_n = 512 if a.quick else 2048
  peaks = [bench_core.matmul_peak(peak_n, 5)]
  print(f'float32 matmul peak at the start ({peak_n}^3, best of 5): {peaks[0] / 1e9:,.1f} '
        f'GFLOP/s; torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'transformers {transformers.__version__}')
  results = {}
  for size in a.sizes.split(','):
    rng = np.random.default_rng(0)
    model, params, hf = build(size, rng)
    c = model.config
    print(f'\n== {size}: {c.embed_dim} x {c.num_layers} layers, vocab {c.vocab_size}, heads '
          f'{c.num_heads}/{c.num_kv_heads} kv x {c.head_dim}; batch {a.batch}, prompt '
          f'{a.prompt_len}, {a.new_tokens} new tokens; train {a.train_batch or a.batch} x '
          f'{a.train_len}')
    results[size] = {}
    if 'sampler' in a.parts:
      bench_sampler(model, params, hf, a, rng, results[size])
    if 'train' in a.parts:
      bench_train(model, params, hf, a, rng, results[size])
    if 'score' in a.parts:
      bench_score(model, params, a, rng, results[size])
  peaks.append(bench_core.matmul_peak(peak_n, 5))
  print(f'\nfloat32 matmul peak at the end: {peaks[1] / 1e9:,.1f} GFLOP/s '
        f'(start/end {peaks[0] / peaks[1]:.2f})')
  print(f'command: {shlex.join(["python"] + sys.argv)}')
  print(f'jax {jax.__version__}; {jax.device_count()} x {jax.devices()[0].platform}')
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
