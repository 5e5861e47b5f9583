"""Bytes per device of a SCoRe run, before running it: does it fit, and what to change.

    python -m score_jax.memory --model=gemma2_2b --batch=512 --seq_len=2048 --mesh=data:8 \
        --hbm_gb=32 [--microbatches=8] [--param_dtype=float32] [--embed_dim=... any field]

What is live: between steps a run holds exactly one policy (its params and Adam state,
with the float32 master inside it for bf16 params) and one frozen reference; params of
earlier phases are freed. The loss step adds its batch, gradients and activations; the
sampler, which never runs at the same time, adds its KV cache and prefill.

Formula (P params: embeddings (twice when the head is untied), attention incl. q/k/v
biases, MLP, norms; L layers, V vocab, D width, F hidden, N/K heads/kv heads, H head dim;
b = episodes per device per microbatch, S = training sequence length, T = b*S; the
'model' axis divides every head, F and V term, the batch splits over 'data' only):
  policy params   P * bytes(param_dtype) / shard          shard = product of --param_axes
  Adam state      'f32_master' (what train.py builds): with bf16 params an f32 master copy
                  + 2 f32 moments (12 bytes/param), with f32 params just the 2 moments;
                  'param_dtype': 2 moments in the param dtype, no master (an optimizer
                  that updates bf16 weights directly)
  reference       P * bytes(reference_dtype) / shard      frozen: no grads, no moments
  batch           episodes per device * S * 9 (int32 tokens and turns, bool validity)
  gradients       P * bytes(param_dtype) / shard, + P * 4 / shard for the float32 sum
                  when there are several microbatches
  activations     no remat: (L + 1) * T * layer_bytes (every block's saved activations,
                  and the gradients of one block's while the backward pass is in it);
                  per-layer remat: L * T * D * a (block inputs) + 2 * T * layer_bytes
                  (one block recomputed, and its backward)
    layer_bytes = a * (6D [+2D post-norms] + (2N + 2K) H + 4F) + N * S * (4 + a)
                  (a = bytes(dtype); norms/residual D's; q,k,v and attention output; gate,
                  up, gelu(gate), product; f32 attention logits + probs per query: no
                  flash attention, so this term is quadratic in S)
  log-prob chunk  3 * b * C * V * 4 (f32 logits, softmax, their gradient; one chunk of C
                  positions is live at a time) + 2 * T * D * a (final hidden and its grad)
  KV cache        B_s * L * 2 * K * S_c * H * a + B_s * S_c * 4 (slot positions), B_s the
                  sampling batch per device, S_c the cache length
  prefill         B_s * prompt_len * (2 D a + max(N S_c (4 + a) + (N + 2K) H a, 3 F a)):
                  no gradient, so one op of one layer at a time
  decode logits   3 * B_s * V * 4 (logits, log-softmax, sampling probabilities)
train peak = live + batch + gradients + activations + log-prob chunk;
sampler peak = live + KV cache + prefill + decode logits; peak = the larger.

Checked against XLA's own figure (`compile().memory_analysis()`: arguments + outputs -
donated aliases + temporaries) on CPU, tests/memory_test.py: the train step (rl_step)
within 15% for float32 activations without remat on one device and on data x model
meshes 8x1, 4x2, 2x4 (measured 0.90-1.06); the sampler within 25% (measured 0.85-1.08;
XLA:CPU keeps copies of part of the cache in the decode loop). Not checkable here:
bfloat16 activations (XLA:CPU computes them in float32) and the savings of remat.

Assumptions: every large matrix is sharded over all of --param_axes (FSDP + tensor
parallel rules), the batch over 'data' (and 'fsdp'), activations laid out by the model's
hints (model.constrain), nothing is offloaded; the all-gathered FSDP weights of a layer
are not counted, so leave ~10-20% headroom. The reference forward (no gradient) needs
only one layer's activations at a time and runs before the policy's, so it is not
counted.
"""
import argparse
import dataclasses
import math
import sys
from typing import Optional

import jax.numpy as jnp

from score_jax import model as model_lib

GIB = 1024 ** 3


def nbytes(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def param_count(c: model_lib.ModelConfig) -> int:
  """Exact number of parameters of `Transformer(c)` (checked against eval_shape in tests)."""
  D, F, N, K, H = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  attn = (3 * N * D * H if K == N else N * D * H + 2 * K * D * H) + N * H * D
  attn += (N + 2 * K) * H * c.qkv_bias
  norms = D * (2 + c.use_post_attn_norm + c.use_post_ffw_norm) + 2 * H * c.use_qk_norm
  embeddings = c.vocab_size * D * (1 if c.tie_embeddings else 2)  # + an untied lm_head
  return embeddings + c.num_layers * (attn + 3 * D * F + norms) + D


@dataclasses.dataclass(frozen=True)
class Run:
  batch: int  # episodes per step (global)
  seq_len: int  # training sequence: prompt + y1 + instruction + y2
  mesh: tuple[tuple[str, int], ...] = (('data', 1),)
  param_axes: Optional[tuple[str, ...]] = None  # None: every mesh axis (FSDP)
  microbatches: int = 1
  # KV-cache rows per sampler call (global): rollout.slots if set, else the episodes per
  # call (rollout.batch_size); None: batch
  sample_batch: Optional[int] = None
  cache_len: Optional[int] = None  # KV cache slots; None: seq_len
  prompt_len: Optional[int] = None  # tokens prefilled at once; None: cache_len // 4
  logprob_chunk: int = 256
  reference_dtype: str = 'bfloat16'
  optimizer_state: str = 'f32_master'  # what train.py builds; or 'param_dtype'


def estimate(c: model_lib.ModelConfig, run: Run) -> dict[str, float]:
  """Bytes per device of each part, and the training / sampling peaks (module docstring)."""
  axes = dict(run.mesh)
  param_axes = tuple(axes) if run.param_axes is None else run.param_axes
  shard = math.prod(axes.get(a, 1) for a in param_axes)
  batch_split = axes.get('data', 1) * axes.get('fsdp', 1)
  model_split = axes.get('model', 1)
  P = param_count(c)
  pb, a = nbytes(c.param_dtype), nbytes(c.dtype)
  out = dict(param_count=P)
  out['policy params'] = P * pb / shard
  if run.optimizer_state == 'f32_master':
    per_param = 12 if pb < 4 else 8
  elif run.optimizer_state == 'param_dtype':
    per_param = 2 * pb
  else:
    raise ValueError(f'optimizer_state={run.optimizer_state!r}: f32_master or param_dtype')
  out['Adam state'] = P * per_param / shard
  out['reference params'] = P * nbytes(run.reference_dtype) / shard
  out['live between steps'] = (out['policy params'] + out['Adam state'] +
                               out['reference params'])
  # One microbatch's gradient, plus the float32 sum over microbatches when there are several.
  out['gradients'] = P * (pb + (4 if run.microbatches > 1 else 0)) / shard

  if run.batch % (batch_split * run.microbatches):
    raise ValueError(f'batch {run.batch} does not split into {batch_split} devices x '
                     f'{run.microbatches} microbatches')
  b = run.batch // (batch_split * run.microbatches)
  S, T = run.seq_len, b * run.seq_len
  D, F, N, K, H, L, V = (c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.num_layers, c.vocab_size)
  # tokens and turn ids (int32) and validity (bool) of this device's share of the batch
  out['batch'] = run.batch // batch_split * S * 9
  out['activations (no remat)'] = (L + 1) * T * _layer_bytes(c, S, model_split)
  out['activations (remat)'] = L * T * D * a + 2 * T * _layer_bytes(c, S, model_split)
  out['log-prob chunk'] = 3 * b * run.logprob_chunk * V * 4 / model_split + 2 * T * D * a

  bs = (run.sample_batch or run.batch) // batch_split
  sc = run.cache_len or run.seq_len
  prompt = run.prompt_len or sc // 4
  kv_split = model_split if K % model_split == 0 else 1
  out['KV cache'] = bs * L * 2 * K * sc * H * a / kv_split + bs * sc * 4
  out['prefill'] = bs * prompt * _prefill_bytes(c, sc, model_split)
  out['decode logits'] = 3 * bs * V * 4 / model_split

  train = out['batch'] + out['gradients'] + out['log-prob chunk']
  sample = out['KV cache'] + out['prefill'] + out['decode logits']
  out['sampler peak'] = out['live between steps'] + sample
  for mode in ('no remat', 'remat'):
    out[f'train peak ({mode})'] = (out['live between steps'] + train +
                                   out[f'activations ({mode})'])
    out[f'peak ({mode})'] = max(out[f'train peak ({mode})'], out['sampler peak'])
  return out


def _layer_bytes(c: model_lib.ModelConfig, keys: int, model_split: int) -> float:
  """Bytes per token of one block's saved activations, attending over `keys` positions
  (module docstring); head and hidden terms split over the `model` axis."""
  D, F, N, K, H = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  a = nbytes(c.dtype)
  post = 2 * D * (c.use_post_attn_norm or c.use_post_ffw_norm)
  return a * (6 * D + post) + (a * ((2 * N + 2 * K) * H + 4 * F) + N * keys * (4 + a)) / model_split


def _prefill_bytes(c: model_lib.ModelConfig, keys: int, model_split: int) -> float:
  """Bytes per prompt token live while the prompt is prefilled: no gradient, so one op of
  one layer at a time, the larger of attention (q, k, v, f32 logits and probs over `keys`
  cache slots) and the MLP (gate, up, product), beside the residual stream and its norm."""
  D, F, N, K, H = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  a = nbytes(c.dtype)
  attention = N * keys * (4 + a) + (N + 2 * K) * H * a
  return 2 * D * a + max(attention, 3 * F * a) / model_split


ROWS = ('policy params', 'Adam state', 'reference params', 'live between steps',
        'batch', 'gradients', 'activations (no remat)', 'activations (remat)',
        'log-prob chunk', 'train peak (no remat)', 'train peak (remat)', 'KV cache',
        'prefill', 'decode logits', 'sampler peak', 'peak (no remat)',
        'peak (remat)')


def format_table(est: dict, hbm_gb: Optional[float] = None, title: str = '') -> str:
  lines = [title] if title else []
  lines.append(f'{"part (per device)":<26}{"GiB":>10}')
  for row in ROWS:
    lines.append(f'{row:<26}{est[row] / GIB:>10.2f}')
  if hbm_gb:
    for mode in ('no remat', 'remat'):
      peak = est[f'peak ({mode})'] / GIB
      verdict = 'fits' if peak <= 0.9 * hbm_gb else 'does NOT fit'
      lines.append(f'{mode}: {peak:.1f} GiB of {hbm_gb:g} GiB HBM -> {verdict} '
                   '(90% usable)')
  return '\n'.join(lines)


def _parse_mesh(spec: str) -> tuple[tuple[str, int], ...]:
  try:
    return tuple((name, int(size)) for name, size in (p.split(':') for p in spec.split(',')))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'--mesh={spec!r}: expected axis:size[,axis:size]') from e


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', help='a score_jax.presets name (e.g. gemma2_2b)')
  parser.add_argument('--batch', type=int, required=True, help='episodes per step')
  parser.add_argument('--seq_len', type=int, required=True, help='training sequence length')
  parser.add_argument('--mesh', type=_parse_mesh, default=(('data', 1),), help='data:8,model:2')
  parser.add_argument('--param_axes', default=None,
                      help='axes the params are sharded over (default: all; "" = replicated)')
  parser.add_argument('--microbatches', type=int, default=1)
  parser.add_argument('--sample_batch', type=int, default=None)
  parser.add_argument('--cache_len', type=int, default=None)
  parser.add_argument('--prompt_len', type=int, default=None)
  parser.add_argument('--logprob_chunk', type=int, default=256)
  parser.add_argument('--reference_dtype', default='bfloat16')
  parser.add_argument('--optimizer_state', default='f32_master',
                      choices=('f32_master', 'param_dtype'))
  parser.add_argument('--hbm_gb', type=float, default=None, help='per-device memory')
  fields = {f.name: f for f in dataclasses.fields(model_lib.ModelConfig)}
  for name in fields:
    parser.add_argument(f'--{name}', default=None)
  args = parser.parse_args(argv)

  values = {}
  if args.model:
    from score_jax import presets
    values.update(presets.get(args.model))
  for name, f in fields.items():
    raw = getattr(args, name)
    if raw is not None:
      default = f.default if f.default is not dataclasses.MISSING else 0
      if isinstance(default, bool):
        values[name] = raw.lower() in ('1', 'true')
      elif isinstance(default, (int, float)):
        values[name] = type(default)(raw)
      elif default is None:  # optional numbers: window, soft-caps, query scalar
        values[name] = None if raw.lower() == 'none' else float(raw) if '.' in raw else int(raw)
      else:
        values[name] = raw
  try:
    config = model_lib.ModelConfig(**values)
  except TypeError as e:
    parser.error(f'give --model or every ModelConfig size field: {e}')
  param_axes = None
  if args.param_axes is not None:
    param_axes = tuple(a for a in args.param_axes.split(',') if a)
  run = Run(batch=args.batch, seq_len=args.seq_len, mesh=args.mesh, param_axes=param_axes,
            microbatches=args.microbatches, sample_batch=args.sample_batch,
            cache_len=args.cache_len, prompt_len=args.prompt_len, logprob_chunk=args.logprob_chunk,
            reference_dtype=args.reference_dtype, optimizer_state=args.optimizer_state)
  est = estimate(config, run)
  mesh = ','.join(f'{n}:{s}' for n, s in run.mesh)
  title = (f'{args.model or "custom"}: {est["param_count"] / 1e9:.2f}B params '
           f'({config.param_dtype}, activations {config.dtype}), batch {run.batch} x '
           f'{run.seq_len} tokens, {run.microbatches} microbatch(es), mesh {mesh}, '
           f'Adam {run.optimizer_state}')
  table = format_table(est, args.hbm_gb, title)
  print(table)
  return table


if __name__ == '__main__':
  main(sys.argv[1:])
