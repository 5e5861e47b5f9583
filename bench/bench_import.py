"""HF safetensors import speed and host memory: writes a synthetic checkpoint, imports it.

    python bench/bench_import.py                      # Gemma-2B-shaped (Gemma 1 2B), bf16, ~5 GB
    python bench/bench_import.py --layers=4 --vocab=32000   # a scaled-down one
    python bench/bench_import.py --shards=3 --param_dtype=float32 --dir=/tmp/ckpt

Prints file size, import time and MB/s (file bytes per second), the peak host RSS growth
during the import (VmHWM, reset to the current RSS just before by writing 5 to
/proc/self/clear_refs) and its ratio to the file size. On the CPU backend the imported
params are host memory themselves, so ~1x (same dtype) is the floor; the rest is the
streaming overhead (about two copies of the largest param). The file is written tensor by
tensor with a streaming writer (values: a repeated random block, cheap to make) and read
back cold only if the page cache is dropped, which this does not do: MB/s is a warm-cache
number (copy + convert + device_put), not disk speed.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from score_jax.weights import hf as import_hf  # noqa: E402
from score_jax import model as model_lib  # noqa: E402

_ST = {np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.float32): 'F32'}


def hf_shapes(a) -> dict:
  n, k, h, d, f = a.heads, a.kv_heads, a.head_dim, a.embed_dim, a.hidden_dim
  shapes = {'model.embed_tokens.weight': (a.vocab, d), 'model.norm.weight': (d,)}
  for i in range(a.layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'self_attn.q_proj.weight': (n * h, d),
                   p + 'self_attn.k_proj.weight': (k * h, d),
                   p + 'self_attn.v_proj.weight': (k * h, d),
                   p + 'self_attn.o_proj.weight': (d, n * h),
                   p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                   p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
                   p + 'post_attention_layernorm.weight': (d,)})
  return shapes


def write_streaming(file: str, shapes: dict, dtype) -> None:
  """safetensors written one tensor at a time (never the whole model in memory)."""
  dtype = np.dtype(dtype)
  header, offset = {}, 0
  for name, shape in shapes.items():
    n = int(np.prod(shape)) * dtype.itemsize
    header[name] = dict(dtype=_ST[dtype], shape=list(shape), data_offsets=[offset, offset + n])
    offset += n
  raw = json.dumps(header).encode()
  raw += b' ' * (-len(raw) % 8)
  block = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(dtype)
  with open(file, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little') + raw)
    for shape in shapes.values():
      size = int(np.prod(shape))
      for start in range(0, size, block.size):
        f.write(block[:min(block.size, size - start)].tobytes())


def write_checkpoint(directory: str, shapes: dict, dtype, shards: int) -> list[str]:
  names = list(shapes)
  if shards == 1:
    files = {'model.safetensors': names}
  else:
    files = {f'model-{j + 1:05d}-of-{shards:05d}.safetensors': names[j::shards]
             for j in range(shards)}
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump(dict(metadata={}, weight_map={n: fn for fn, ns in files.items() for n in ns}), f)
  for fn, ns in files.items():
    write_streaming(os.path.join(directory, fn), {n: shapes[n] for n in ns}, dtype)
  return [os.path.join(directory, fn) for fn in files]


def _status_bytes(field: str) -> int:
  with open('/proc/self/status') as f:
    return int(next(l for l in f if l.startswith(field + ':')).split()[1]) * 1024


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  # Defaults: Gemma 1 2B ([ref] gemma_2b; presets.get('gemma1_2b')).
  p.add_argument('--vocab', type=int, default=256_000)
  p.add_argument('--embed_dim', type=int, default=2048)
  p.add_argument('--hidden_dim', type=int, default=16_384)
  p.add_argument('--layers', type=int, default=18)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--kv_heads', type=int, default=1)
  p.add_argument('--head_dim', type=int, default=256)
  p.add_argument('--file_dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--param_dtype', default='bfloat16')
  p.add_argument('--shards', type=int, default=2)
  p.add_argument('--dir', default=None, help='where to write (default: a temp dir, removed)')
  a = p.parse_args(argv)
  print('command:', ' '.join([os.path.basename(sys.executable), *sys.argv]))

  directory = a.dir or tempfile.mkdtemp(prefix='bench_import_')
  os.makedirs(directory, exist_ok=True)
  try:
    shapes = hf_shapes(a)
    t0 = time.perf_counter()
    files = write_checkpoint(directory, shapes, ml_dtypes.bfloat16 if a.file_dtype == 'bfloat16'
                             else np.float32, a.shards)
    size = sum(os.path.getsize(f) for f in files)
    print(f'wrote {size / 1e9:.2f} GB in {len(files)} file(s) in '
          f'{time.perf_counter() - t0:.1f} s ({directory})')

    config = model_lib.ModelConfig(a.vocab, a.embed_dim, a.hidden_dim, a.layers, a.heads,
                                   a.kv_heads, a.head_dim, param_dtype=a.param_dtype)
    abstract = import_hf.abstract_params(config)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    rss_before = _status_bytes('VmRSS')
    t0 = time.perf_counter()
    params = import_hf.load_safetensors(directory, config, abstract=abstract)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = _status_bytes('VmHWM')
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    growth = peak - rss_before
    print(f'params: {sum(x.size for x in jax.tree.leaves(params)) / 1e9:.3f}B '
          f'({a.param_dtype}, {param_bytes / 1e9:.2f} GB) on {jax.devices()[0].platform}')
    print(f'import: {seconds:.2f} s, {size / 1e6 / seconds:.0f} MB/s (file bytes, warm page '
          f'cache)')
    print(f'peak host RSS: {peak / 1e9:.2f} GB; growth during import {growth / 1e9:.2f} GB = '
          f'{growth / size:.2f}x the file size ({growth / param_bytes:.2f}x the params)')
  finally:
    if a.dir is None:
      shutil.rmtree(directory, ignore_errors=True)


if __name__ == '__main__':
  main()
