"""The memory estimator against a hand computation and against the real arrays' sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax.weights import hf as import_hf
from score_jax import memory
from score_jax import model as model_lib
from score_jax import train


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_hand_computed_tiny_case():
  c = model_lib.ModelConfig(vocab_size=10, embed_dim=4, hidden_dim=8, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=2)
  run = memory.Run(batch=4, seq_len=8, mesh=(('data', 2), ('model', 2)), logprob_chunk=4)
  est = memory.estimate(c, run)
  # embed 10*4 + q 2*4*2 + kv 2*1*4*2 + o 2*2*4 + gating 2*4*8 + linear 8*4 + norms 2*4 + 4
  assert est['param_count'] == 40 + 16 + 16 + 16 + 64 + 32 + 8 + 4 == 196
  # Params over both axes (4 ways): f32 policy, bf16 reference, f32 params -> 2 f32 moments.
  assert est['policy params'] == 196 * 4 / 4
  assert est['reference params'] == 196 * 2 / 4
  assert est['Adam state'] == 196 * 8 / 4
  assert est['gradients'] == 196 * 4 / 4
  # b = 4 episodes / 2 data shards = 2, T = 16 tokens. Per token per layer:
  # 4 bytes * 6D = 96, plus over the model axis (/2): 4*((2N+2K)H + 4F) + N*S*(4+4)
  # = (4*(6*2 + 32) + 2*8*8) / 2 = 152.
  per_token = 96 + 152
  assert est['activations (no remat)'] == 1 * 16 * per_token
  assert est['activations (remat)'] == 16 * 4 * 4 + 16 * per_token
  assert est['log-prob chunk'] == 3 * 2 * 4 * 10 * 4 + 2 * 16 * 4 * 4
  # K=1 does not split over model:2. 2 episodes * 1 layer * (k,v) * K * 8 slots * H * 4
  # + slot positions 2 * 8 * int32.
  assert est['KV cache'] == 2 * 1 * 2 * 1 * 8 * 2 * 4 + 2 * 8 * 4
  assert est['decode logits'] == 2 * 10 * 4
  fixed = 196 + 98 + 392
  assert est['peak (no remat)'] == fixed + max(196 + 16 * per_token + 1472, 576 + 80)


@pytest.mark.parametrize('kw', [
    dict(num_heads=4, num_kv_heads=1),
    dict(num_heads=2, num_kv_heads=2),  # fused qkv
    dict(num_heads=4, num_kv_heads=2, use_post_attn_norm=True, use_post_ffw_norm=True,
         use_qk_norm=True),
    dict(num_heads=4, num_kv_heads=2, qkv_bias=True, tie_embeddings=False),  # Qwen2.5 7B
    dict(num_heads=2, num_kv_heads=2, qkv_bias=True),  # fused q/k/v biases
])
def test_sizes_match_the_real_arrays(kw):
  c = model_lib.ModelConfig(vocab_size=50, embed_dim=16, hidden_dim=24, num_layers=3,
                            head_dim=8, param_dtype='bfloat16', **kw)
  params = import_hf.abstract_params(c)
  run = memory.Run(batch=3, seq_len=12, optimizer_state='param_dtype')
  est = memory.estimate(c, run)
  assert est['param_count'] == sum(x.size for x in jax.tree.leaves(params))
  assert est['policy params'] == _bytes(params)
  # Plain Adam on the bf16 params: moments in the param dtype (+ tiny counters).
  opt = jax.eval_shape(train.make_optimizer(1e-5, 1.0).init, params)
  assert 0 <= _bytes(opt) - est['Adam state'] <= 64
  # What the trainer builds for bf16 params: a float32 master copy with float32 moments,
  # 12 bytes per param.
  opt32 = jax.eval_shape(train.make_optimizer(1e-5, 1.0, float32_master=True).init, params)
  est32 = memory.estimate(c, memory.Run(batch=3, seq_len=12, optimizer_state='f32_master'))
  assert 0 <= _bytes(opt32) - est32['Adam state'] <= 64
  assert memory.Run(batch=1, seq_len=1).optimizer_state == 'f32_master'
  cache = jax.eval_shape(lambda: model_lib.init_cache(c, 3, 12))
  assert est['KV cache'] == _bytes(cache)


def test_activation_estimate_is_near_xla_for_no_remat():
  """XLA:CPU's temp buffers of a forward+backward vs the no-remat activation estimate.

  Loose by design (XLA fuses and reuses buffers); it catches an estimate that is off by
  an order of magnitude, e.g. a forgotten S^2 attention term. XLA:CPU does not realise
  the savings of remat in its schedule, so remat is not checked here.
  """
  c = model_lib.ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=256, num_layers=4,
                            num_heads=4, num_kv_heads=2, head_dim=16)
  model = model_lib.Transformer(c)
  B, S = 8, 128

  def loss(p, tokens):
    valid = jnp.ones(tokens.shape, bool)
    h, _ = model.apply({'params': p}, tokens, model_lib.positions_from_valid(valid),
                       model_lib.causal_attention_mask(valid), return_hidden=True)
    return jnp.mean(h.astype(jnp.float32) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(
      import_hf.abstract_params(c), jax.ShapeDtypeStruct((B, S), jnp.int32)).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip('this backend gives no memory analysis')
  est = memory.estimate(c, memory.Run(batch=B, seq_len=S))
  ratio = (est['activations (no remat)'] + est['gradients']) / analysis.temp_size_in_bytes
  assert 0.5 < ratio < 2.0, ratio


def test_cli_prints_table_and_verdict(capsys):
  table = memory.main(['--vocab_size=1000', '--embed_dim=64', '--hidden_dim=128',
                       '--num_layers=2', '--num_heads=4', '--num_kv_heads=1', '--head_dim=16',
                       '--param_dtype=bfloat16', '--batch=16', '--seq_len=64',
                       '--mesh=data:4,model:2', '--param_axes=model', '--hbm_gb=0.001'])
  assert table == capsys.readouterr().out.strip()
  c = model_lib.ModelConfig(1000, 64, 128, 2, 4, 1, 16, param_dtype='bfloat16')
  est = memory.estimate(c, memory.Run(batch=16, seq_len=64, mesh=(('data', 4), ('model', 2)),
                                      param_axes=('model',)))
  assert f'{est["policy params"] / memory.GIB:.2f}' in table
  assert est['policy params'] == memory.param_count(c) * 2 / 2
  assert 'does NOT fit' in table
  with pytest.raises(ValueError, match='does not split'):
    memory.estimate(c, memory.Run(batch=6, seq_len=8, mesh=(('data', 4),)))


def test_presets_by_name():
  from score_jax import presets
  # Published sizes: Gemma 2 2B has 2.61B parameters, 9B 9.24B (with the 256k embedding).
  assert round(memory.param_count(model_lib.ModelConfig(**presets.get('gemma2_2b'))) / 1e9,
               2) == 2.61
  assert round(memory.param_count(model_lib.ModelConfig(**presets.get('gemma2_9b'))) / 1e9,
               2) == 9.24


def test_cli_reads_optional_numeric_fields():
  """Window, soft-caps and query scalar default to None; the CLI must give them numbers."""
  args = ['--vocab_size=1000', '--embed_dim=64', '--hidden_dim=128', '--num_layers=2',
          '--num_heads=4', '--num_kv_heads=1', '--head_dim=16', '--batch=16', '--seq_len=64']
  local = memory.main(args + ['--local_global_pattern=2', '--sliding_window_size=32',
                              '--attn_logits_soft_cap=50.0'])
  plain = memory.main(args)
  assert 'policy params' in local and local.splitlines()[1:] == plain.splitlines()[1:]
