"""Tests of the Gemma-style decoder on tiny configs, against a NumPy re-implementation."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_jax import model as model_lib


def tiny_config(num_heads=4, num_kv_heads=2, num_layers=2, **kw):
  return model_lib.ModelConfig(vocab_size=40, embed_dim=32, hidden_dim=48,
                               num_layers=num_layers, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, head_dim=8, **kw)


def init(config, seed=0):
  model = model_lib.Transformer(config)
  return model, _init(model, seed)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, seed):
  """Params with non-zero norm scales, so a missing `1 + scale` would show."""
  tokens = jnp.ones((1, 4), jnp.int32)
  valid = jnp.ones((1, 4), bool)
  params = model.init(jax.random.key(seed), tokens, model_lib.positions_from_valid(valid),
                      model_lib.causal_attention_mask(valid))
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) if 'scale' in jax.tree_util.keystr(p)
            else x for (p, x), k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def forward(model, params, tokens_BxL, valid_BxL):
  return np.asarray(_forward(model, params, jnp.asarray(tokens_BxL), jnp.asarray(valid_BxL)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens_BxL, valid_BxL):
  logits, _ = model.apply(params, tokens_BxL, model_lib.positions_from_valid(valid_BxL),
                          model_lib.causal_attention_mask(valid_BxL))
  return logits


def test_from_config_reads_config_dict():
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=40, embed_dim=32, hidden_dim=48, num_layers=1, num_heads=4, num_kv_heads=1,
      head_dim=8, dtype='bfloat16', remat=True))
  config = model_lib.ModelConfig.from_config(cfg)
  assert config == model_lib.ModelConfig(40, 32, 48, 1, 4, 1, 8, dtype='bfloat16', remat=True)


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_param_tree_matches_gemma(num_kv_heads):
  _, params = init(tiny_config(num_kv_heads=num_kv_heads))
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree.flatten_with_path(params['params'])[0]}
  N, K, D, H, F, V = 4, num_kv_heads, 32, 8, 48, 40
  expected = {"['embedder']['input_embedding']": (V, D), "['final_norm']['scale']": (D,)}
  for i in range(2):
    layer = f"['layer_{i}']"
    expected.update({
        f"{layer}['pre_attention_norm']['scale']": (D,),
        f"{layer}['attn']['attn_vec_einsum']['w']": (N, H, D),
        f"{layer}['pre_ffw_norm']['scale']": (D,),
        f"{layer}['mlp']['gating_einsum']": (2, D, F),
        f"{layer}['mlp']['linear']": (F, D)})
    if K == N:  # Gemma fuses the projections when kv heads are not shared
      expected[f"{layer}['attn']['qkv_einsum']['w']"] = (3, N, D, H)
    else:
      expected[f"{layer}['attn']['q_einsum']['w']"] = (N, D, H)
      expected[f"{layer}['attn']['kv_einsum']['w']"] = (2, K, D, H)
  assert shapes == expected


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_padding_invariance(num_kv_heads):
  model, params = init(tiny_config(num_kv_heads=num_kv_heads))
  seq = [2, 7, 11, 5, 30, 9]
  # Row 0: no padding. Row 1: left padding and interior pads (odd token ids, invalid).
  layout = [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1]
  tokens_1, it = [], iter(seq)
  for is_valid in layout:
    tokens_1.append(next(it) if is_valid else 17)
  logits_0 = forward(model, params, [seq], np.ones((1, 6), bool))[0]
  logits_1 = forward(model, params, [tokens_1], np.array([layout], bool))[0]
  np.testing.assert_allclose(logits_1[np.array(layout, bool)], logits_0, atol=1e-5, rtol=0)


def test_causal():
  model, params = init(tiny_config())
  tokens = np.array([[2, 7, 11, 5, 30, 9]])
  changed = tokens.copy()
  changed[0, 4] = 21
  valid = np.ones_like(tokens, bool)
  a, b = forward(model, params, tokens, valid), forward(model, params, changed, valid)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_fully_masked_rows_are_finite():
  model, params = init(tiny_config())
  logits = forward(model, params, np.zeros((1, 6), int), np.zeros((1, 6), bool))
  assert np.isfinite(logits).all()


def _numpy_forward(p, tokens_L, num_heads, num_kv_heads, base=10_000):
  """Forward pass in float64 NumPy, written from the Gemma equations."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p['params'])
  emb_VxD = p['embedder']['input_embedding']
  D = emb_VxD.shape[1]
  L = len(tokens_L)

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + scale)

  def rope(x_LxNxH):
    half = x_LxNxH.shape[-1] // 2
    freq = base ** (-np.arange(half) / half)  # base ** (-2i / H)
    angle = np.arange(L)[:, None, None] * freq
    a, b = x_LxNxH[..., :half], x_LxNxH[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], axis=-1)

  def attention(h, attn):
    if 'qkv_einsum' in attn:
      wq, wk, wv = attn['qkv_einsum']['w']
    else:
      wq = attn['q_einsum']['w']
      wk, wv = attn['kv_einsum']['w']
    group = num_heads // num_kv_heads
    wk, wv = np.repeat(wk, group, axis=0), np.repeat(wv, group, axis=0)  # head n -> kv n//G
    q = rope(np.einsum('ld,ndh->lnh', h, wq)) * wq.shape[-1] ** -0.5
    k = rope(np.einsum('ld,ndh->lnh', h, wk))
    v = np.einsum('ld,ndh->lnh', h, wv)
    scores = np.einsum('lnh,snh->nls', q, k)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum('lnh,nhd->ld', np.einsum('nls,snh->lnh', probs, v),
                     attn['attn_vec_einsum']['w'])

  def mlp(h, w):
    g = h @ w['gating_einsum'][0]
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    return (gelu * (h @ w['gating_einsum'][1])) @ w['linear']

  x = emb_VxD[tokens_L] * np.sqrt(D)
  for i in range(len(p) - 2):  # all but embedder and final_norm
    layer = p[f'layer_{i}']
    x = x + attention(rms_norm(x, layer['pre_attention_norm']['scale']), layer['attn'])
    x = x + mlp(rms_norm(x, layer['pre_ffw_norm']['scale']), layer['mlp'])
  return rms_norm(x, p['final_norm']['scale']) @ emb_VxD.T


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_matches_numpy_reference(num_kv_heads):
  model, params = init(tiny_config(num_kv_heads=num_kv_heads))
  tokens = np.array([2, 7, 11, 5, 30, 9])
  got = forward(model, params, tokens[None], np.ones((1, 6), bool))[0]
  want = _numpy_forward(params, tokens, 4, num_kv_heads)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_remat_and_bfloat16():
  model, params = init(tiny_config())
  tokens, valid = np.array([[2, 7, 11, 5, 30, 9]]), np.ones((1, 6), bool)
  want = forward(model, params, tokens, valid)
  remat = model_lib.Transformer(tiny_config(remat=True))
  np.testing.assert_allclose(forward(remat, params, tokens, valid), want, atol=1e-6)
  bf16 = model_lib.Transformer(tiny_config(dtype='bfloat16'))
  got = forward(bf16, params, tokens, valid)
  assert got.dtype == np.float32  # logits stay float32 for log-probs
  np.testing.assert_allclose(got, want, atol=0.15)
