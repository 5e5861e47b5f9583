"""Tests of the Gemma-style decoder on tiny configs, against a NumPy re-implementation."""
import dataclasses
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


@pytest.mark.parametrize('num_kv_heads,llama', [(1, False), (2, False), (4, False), (2, True),
                                               (4, True)])
def test_padding_invariance(num_kv_heads, llama):
  model, params = init(tiny_config(num_kv_heads=num_kv_heads, **(LLAMA_KW if llama else {})))
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


def _numpy_forward(p, tokens_L, config):
  """Forward pass in float64 NumPy, written from the Gemma 1/2/3 equations."""
  c = config
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p['params'])
  emb_VxD = p['embedder']['input_embedding']
  D = emb_VxD.shape[1]
  L = len(tokens_L)

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + scale)

  def cap(x, c):
    return x if c is None else c * np.tanh(x / c)

  def rope(x_LxNxH, base, scale):
    half = x_LxNxH.shape[-1] // 2
    freq = base ** (-np.arange(half) / half) / scale  # base ** (-2i / H) / scale
    angle = np.arange(L)[:, None, None] * freq
    a, b = x_LxNxH[..., :half], x_LxNxH[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], axis=-1)

  def attention(h, attn, is_global):
    if 'qkv_einsum' in attn:
      wq, wk, wv = attn['qkv_einsum']['w']
    else:
      wq = attn['q_einsum']['w']
      wk, wv = attn['kv_einsum']['w']
    group = c.num_heads // c.num_kv_heads
    wk, wv = np.repeat(wk, group, axis=0), np.repeat(wv, group, axis=0)  # head n -> kv n//G
    q, k = np.einsum('ld,ndh->lnh', h, wq), np.einsum('ld,ndh->lnh', h, wk)
    if c.use_qk_norm:
      q, k = rms_norm(q, attn['_query_norm']['scale']), rms_norm(k, attn['_key_norm']['scale'])
    base = c.rope_base if is_global else c.local_rope_base
    scale = c.rope_scale_factor if is_global else 1.0
    q = rope(q, base, scale) * (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    k = rope(k, base, scale)
    v = np.einsum('ld,ndh->lnh', h, wv)
    scores = cap(np.einsum('lnh,snh->nls', q, k), c.attn_logits_soft_cap)
    distance = np.arange(L)[:, None] - np.arange(L)[None, :]
    visible = (distance >= 0) & (is_global | (distance < (c.sliding_window_size or 0)))
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum('lnh,nhd->ld', np.einsum('nls,snh->lnh', probs, v),
                     attn['attn_vec_einsum']['w'])

  def mlp(h, w):
    g = h @ w['gating_einsum'][0]
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    return (gelu * (h @ w['gating_einsum'][1])) @ w['linear']

  x = emb_VxD[tokens_L] * np.sqrt(D)
  for i in range(c.num_layers):
    layer = p[f'layer_{i}']
    n = c.local_global_pattern
    is_global = n <= 1 or (i + 1) % n == 0
    out = attention(rms_norm(x, layer['pre_attention_norm']['scale']), layer['attn'], is_global)
    if c.use_post_attn_norm:
      out = rms_norm(out, layer['post_attention_norm']['scale'])
    x = x + out
    out = mlp(rms_norm(x, layer['pre_ffw_norm']['scale']), layer['mlp'])
    if c.use_post_ffw_norm:
      out = rms_norm(out, layer['post_ffw_norm']['scale'])
    x = x + out
  return cap(rms_norm(x, p['final_norm']['scale']) @ emb_VxD.T, c.final_logit_soft_cap)


# Gemma 2 and 3 switches on the tiny config; windows shorter than the test sequences and caps
# low enough that tanh bends the logits.
GEMMA2_KW = dict(local_global_pattern=2, sliding_window_size=3, attn_logits_soft_cap=1.5,
                 final_logit_soft_cap=2.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                 query_pre_attn_scalar=12)
GEMMA3_KW = dict(local_global_pattern=3, sliding_window_size=3, use_qk_norm=True,
                 use_post_attn_norm=True, use_post_ffw_norm=True, rope_base=1_000_000,
                 local_rope_base=10_000, rope_scale_factor=8.0)

# The Llama-layout switches together (Qwen3-like with Qwen2's biases, an untied head,
# llama3 scaling and Mistral's window on every layer): parity per family is in
# llama_parity_test; here remat, bf16 and the padding layout.
LLAMA_KW = dict(mlp_activation='silu', norm_plus_one=False, scale_embeddings=False,
                norm_eps=1e-5, tie_embeddings=False, qkv_bias=True, use_qk_norm=True,
                all_layers_local=True, sliding_window_size=3, rope_base=500_000,
                rope_llama3_factor=8.0, rope_llama3_original_max_len=64)


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_matches_numpy_reference(num_kv_heads):
  config = tiny_config(num_kv_heads=num_kv_heads)
  model, params = init(config)
  tokens = np.array([2, 7, 11, 5, 30, 9])
  got = forward(model, params, tokens[None], np.ones((1, 6), bool))[0]
  want = _numpy_forward(params, tokens, config)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kw', [GEMMA2_KW, GEMMA3_KW], ids=['gemma2', 'gemma3'])
def test_gemma2_3_match_numpy_reference(kw):
  """Soft-caps, post-norms, query scalar, QK-norm, sliding window (shorter than the
  sequence), per-type rotary bases and scaling, all against the float64 reference."""
  config = tiny_config(num_layers=3, **kw)
  model, params = init(config)
  tokens = np.array([2, 7, 11, 5, 30, 9, 14, 3, 22])
  got = forward(model, params, tokens[None], np.ones((1, 9), bool))[0]
  want = _numpy_forward(params, tokens, config)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Each switch matters on this input: turning it off moves the logits.
  for name, off in [('final_logit_soft_cap', None), ('attn_logits_soft_cap', None),
                    ('sliding_window_size', 100), ('rope_scale_factor', 1.0),
                    ('query_pre_attn_scalar', None)]:
    if kw.get(name, off) != off:
      changed = dataclasses.replace(config, **{name: off})
      assert np.abs(_numpy_forward(params, tokens, changed) - want).max() > 1e-3, name


def test_final_soft_cap_bounds_logits():
  config = tiny_config(**GEMMA2_KW)
  model, params = init(config)
  logits = forward(model, params, np.array([[2, 7, 11, 5, 30, 9]]), np.ones((1, 6), bool))
  assert np.abs(logits).max() < 2.0
  uncapped = forward(model_lib.Transformer(dataclasses.replace(config, final_logit_soft_cap=None)),
                     params, np.array([[2, 7, 11, 5, 30, 9]]), np.ones((1, 6), bool))
  assert np.abs(uncapped).max() > 2.0  # so the cap above is what bounded them
  np.testing.assert_allclose(logits, 2.0 * np.tanh(uncapped / 2.0), atol=1e-5)


def test_sliding_window_counts_positions_not_slots():
  """A local-only model: a token further back than the window cannot affect a query, one
  inside can; with left and interior pads the window still spans valid tokens only."""
  config = tiny_config(num_layers=1, local_global_pattern=100, sliding_window_size=3)
  assert set(config.layer_types()) == {model_lib.LOCAL}
  model, params = init(config)
  seq = np.array([2, 7, 11, 5, 30, 9])
  last = lambda s: forward(model, params, s[None], np.ones((1, 6), bool))[0, -1]
  far, near = seq.copy(), seq.copy()
  far[2] = 21  # position 2, query 5: distance 3 = window -> invisible
  near[3] = 21  # distance 2 -> visible
  np.testing.assert_array_equal(last(far), last(seq))
  assert np.abs(last(near) - last(seq)).max() > 1e-3
  layout = np.array([0, 1, 1, 0, 0, 1, 1, 0, 1, 1], bool)  # pads inside the window's span
  padded = np.full(10, 17)
  padded[layout] = seq
  got = forward(model, params, padded[None], layout[None])[0][layout]
  np.testing.assert_allclose(got, forward(model, params, seq[None], np.ones((1, 6), bool))[0],
                             atol=1e-5, rtol=0)


def test_gemma2_3_param_tree():
  """Gemma reference names for the post-norms and QK-norms (what the importers fill)."""
  _, params = init(tiny_config(num_layers=1, **GEMMA3_KW))
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree.flatten_with_path(params['params']['layer_0'])[0]}
  assert shapes == {
      "['pre_attention_norm']['scale']": (32,), "['post_attention_norm']['scale']": (32,),
      "['pre_ffw_norm']['scale']": (32,), "['post_ffw_norm']['scale']": (32,),
      "['attn']['q_einsum']['w']": (4, 32, 8), "['attn']['kv_einsum']['w']": (2, 2, 32, 8),
      "['attn']['attn_vec_einsum']['w']": (4, 8, 32),
      "['attn']['_query_norm']['scale']": (8,), "['attn']['_key_norm']['scale']": (8,),
      "['mlp']['gating_einsum']": (2, 32, 48), "['mlp']['linear']": (48, 32)}


def test_layer_types_and_config_errors():
  types = tiny_config(num_layers=7, local_global_pattern=6, sliding_window_size=4).layer_types()
  assert types == ('local',) * 5 + ('global', 'local')
  assert tiny_config(num_layers=3).layer_types() == ('global',) * 3
  with pytest.raises(ValueError, match='sliding_window_size=None'):
    tiny_config(local_global_pattern=2)
  with pytest.raises(ValueError, match='num_kv_heads=3'):
    tiny_config(num_kv_heads=3)


def test_presets_build_valid_configs():
  from score_jax import presets
  for name in presets.NAMES:
    config = model_lib.ModelConfig(**presets.get(name))
    assert config.num_heads % config.num_kv_heads == 0
  g = model_lib.ModelConfig(**presets.get('gemma3_27b'))
  assert g.layer_types()[:6] == ('local',) * 5 + ('global',)
  assert g.query_pre_attn_scalar == g.embed_dim // g.num_heads  # 168, not head_dim
  with pytest.raises(ValueError, match="unknown model preset 'gemma4'"):
    presets.get('gemma4')


@pytest.mark.parametrize('kw', [{}, dict(GEMMA3_KW, attn_logits_soft_cap=1.5,
                                         final_logit_soft_cap=2.0), LLAMA_KW],
                         ids=['gemma1', 'all', 'llama_layout'])
def test_remat_and_bfloat16(kw):
  """Every switch on: remat is exact, and bf16 activations (QK-norm, caps, windows
  included) stay close to float32."""
  model, params = init(tiny_config(**kw))
  tokens, valid = np.array([[2, 7, 11, 5, 30, 9]]), np.ones((1, 6), bool)
  want = forward(model, params, tokens, valid)
  remat = model_lib.Transformer(tiny_config(remat=True, **kw))
  np.testing.assert_allclose(forward(remat, params, tokens, valid), want, atol=1e-6)
  bf16 = model_lib.Transformer(tiny_config(dtype='bfloat16', **kw))
  got = forward(bf16, params, tokens, valid)
  assert got.dtype == np.float32  # logits stay float32 for log-probs
  np.testing.assert_allclose(got, want, atol=0.15)
