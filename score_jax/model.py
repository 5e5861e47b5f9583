"""Gemma 1/2/3, Llama 2/3, Qwen2/2.5/3, SmolLM2 and Mistral text decoders (flax.linen) over
the slot layout (README "Design").

One definition; `ModelConfig` switches turn Gemma 1 into Gemma 2 (local/global layers,
soft-capping, post-norms, query scalar) and Gemma 3 (QK-norm, 5 local : 1 global, separate
rotary bases, linear rotary scaling on global layers), and the defaults (Gemma's) into the
Llama layout: SiLU-gated MLP, RMSNorm with a plain scale and the family's epsilon, no
sqrt(D) embedding scale, an untied `lm_head`, q/k/v biases (Qwen2), QK-norm (Qwen3), llama3
rotary scaling (Llama 3.1/3.2), a sliding window on every layer (Mistral). The rotary
embedding is the same split-half rotation in every family (HF's `rotate_half` is Gemma's
layout). `presets.py` names the published sizes. Param names and shapes follow Gemma's
reference `gemma/modules.py` for every family, so one mapping per source (`weights/`)
fills the tree.

The model never sees slot indices: callers pass rotary positions and an attention mask,
which is what makes logits independent of the padding layout. The sliding window is
measured in rotary positions too (a key is visible iff the mask allows it and
query_pos - key_pos < window), so left-padded prompts and the cached decode see the same
keys; the cache stores each slot's position for that.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from score_jax.sharding import DATA_AXIS, MODEL_AXIS

# Finite, so a fully masked row softmaxes to uniform instead of NaN (Gemma's K_MASK).
MASK_VALUE = -2.3819763e38

LOCAL, GLOBAL = 'local', 'global'  # attention types (Gemma's LOCAL_SLIDING / GLOBAL)

# Gated-MLP activations by config name: Gemma's tanh-approximated GELU, Llama's SiLU.
_ACTIVATIONS = {'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True), 'silu': jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Defaults are Gemma 1; the fields after `remat` are the Gemma 2/3 switches."""
  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: int = 10_000  # global layers (every layer unless the pattern has LOCAL ones)
  dtype: str = 'float32'  # activations
  param_dtype: str = 'float32'
  remat: bool = False
  # Layer i is GLOBAL iff (i + 1) % local_global_pattern == 0, else LOCAL (sliding window):
  # 2 for Gemma 2 (local, global, ...), 6 for Gemma 3 (5 local : 1 global); 0: all GLOBAL.
  local_global_pattern: int = 0
  sliding_window_size: int | None = None  # LOCAL: query_pos - key_pos < sliding_window_size
  local_rope_base: int = 10_000
  rope_scale_factor: float = 1.0  # GLOBAL layers: linear scaling, positions / factor
  query_pre_attn_scalar: float | None = None  # queries * scalar ** -0.5; None: head_dim
  attn_logits_soft_cap: float | None = None  # cap * tanh(logits / cap) before the mask
  final_logit_soft_cap: float | None = None
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False  # RMSNorm over head_dim of queries and keys, before rotary
  # The Llama-layout switches (defaults: Gemma).
  mlp_activation: str = 'gelu_tanh'  # 'silu' (Llama, Qwen, Mistral)
  norm_plus_one: bool = True  # RMSNorm scale stored as an offset from 1 (Gemma), else plain
  norm_eps: float = 1e-6
  scale_embeddings: bool = True  # inputs * sqrt(embed_dim) (Gemma only)
  tie_embeddings: bool = True  # False: a separate `embedder/lm_head` [V, D] unembeds
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2), none on the output
  all_layers_local: bool = False  # every layer slides (Mistral), overriding the pattern
  # Llama 3.1 / 3.2 rotary scaling on GLOBAL layers (HF rope_type 'llama3'); None: off.
  rope_llama3_factor: float | None = None
  rope_llama3_low_freq_factor: float = 1.0
  rope_llama3_high_freq_factor: float = 4.0
  rope_llama3_original_max_len: int = 8192

  def __post_init__(self):
    if self.local_global_pattern < 0:
      raise ValueError(f'local_global_pattern={self.local_global_pattern}: must be >= 0')
    if LOCAL in self.layer_types() and not (self.sliding_window_size or 0) > 0:
      raise ValueError(f'sliding_window_size={self.sliding_window_size!r}: local layers '
                       f'(local_global_pattern={self.local_global_pattern}) need a positive '
                       'window')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(f'mlp_activation={self.mlp_activation!r}: one of {sorted(_ACTIVATIONS)}')
    if self.rope_llama3_factor is not None and self.rope_scale_factor != 1.0:
      raise ValueError('rope_llama3_factor and rope_scale_factor (linear) both set: one '
                       'rotary scaling at a time')

  @classmethod
  def from_config(cls, cfg) -> 'ModelConfig':
    """Reads the fields above from a ConfigDict (or dict); other keys are ignored."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: cfg[n] for n in names if n in cfg})

  def layer_types(self) -> tuple[str, ...]:
    """LOCAL/GLOBAL per layer, as HF's `layer_types` and Gemma's `attention_types`."""
    n = self.local_global_pattern
    if self.all_layers_local:
      return (LOCAL,) * self.num_layers
    return tuple(GLOBAL if n <= 1 or (i + 1) % n == 0 else LOCAL
                 for i in range(self.num_layers))


def positions_from_valid(valid_BxL: jax.Array) -> jax.Array:
  """Rotary position of each slot = number of valid slots before it (pads reuse a neighbour's)."""
  return jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def causal_attention_mask(valid_BxL: jax.Array) -> jax.Array:
  """causal & key_valid, plus the diagonal so a pad query still attends to something."""
  length = valid_BxL.shape[-1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  eye_LxL = jnp.eye(length, dtype=bool)
  return (causal_LxL[None] & valid_BxL[:, None, :]) | eye_LxL[None]


def write_slots(buffer, update, slot, axis: int):
  """`buffer` with `update` written from `slot` on along `axis` (> 0, the slot axis):
  the same slot for every row (a scalar: one dynamic_update_slice), or each row's own
  (slot_B: the refilling sampler, whose rows hold episodes at different points)."""
  if jnp.ndim(slot) == 0:
    return jax.lax.dynamic_update_slice(
        buffer, update, tuple(slot if a == axis else 0 for a in range(buffer.ndim)))
  def row(buffer_row, update_row, slot_row):
    return jax.lax.dynamic_update_slice(
        buffer_row, update_row, tuple(slot_row if a == axis - 1 else 0
                                      for a in range(buffer_row.ndim)))
  return jax.vmap(row)(buffer, update, slot)


def init_cache(config: ModelConfig, batch_size: int, cache_size: int, dtype=None) -> dict:
  """Zeroed KV cache, heads-major [B,K,S,H] (measured 2x faster than [B,S,K,H] here), and
  the rotary position of each slot, which the sliding window compares against."""
  dtype = dtype or config.dtype
  shape = (batch_size, config.num_kv_heads, cache_size, config.head_dim)
  cache = {f'layer_{i}': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
           for i in range(config.num_layers)}
  cache['positions'] = jnp.zeros((batch_size, cache_size), jnp.int32)
  return cache


def constrain(x: jax.Array, *axes) -> jax.Array:
  """Lays out an activation over the mesh set with `jax.set_mesh` (a mesh-axis name or
  None per dimension); a no-op without one, and for axes the mesh lacks or that do not
  divide the dimension.

  Without these hints XLA's propagation may take an FSDP weight's layout (model width
  over `data`) for the activations and all-gather the batch instead of the weight:
  measured on 8 CPU devices, every device then computed the whole batch (3x the
  activation memory of a batch split over `data`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = [a if a in mesh.axis_names and size % mesh.shape[a] == 0 else None
          for a, size in zip(axes, x.shape)]
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (Gemma 2), identity when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def window_mask(attn_mask_BxLxS, positions_BxL, key_positions_BxS, window: int):
  """attn_mask & (query_pos - key_pos < window), in rotary positions, not slots: with
  left padding or turn-2 gaps, slot distance overstates how far back a key is."""
  distance_BxLxS = positions_BxL[:, :, None] - key_positions_BxS[:, None, :]
  return attn_mask_BxLxS & (distance_BxLxS < window)


def llama3_timescale(timescale_H2: jax.Array, factor: float, low_freq_factor: float,
                     high_freq_factor: float, original_max_len: int) -> jax.Array:
  """Llama 3.1's rotary rescaling (HF `_compute_llama3_parameters`, in timescales = 1 /
  inv_freq): wavelengths longer than original_max_len / low_freq_factor are stretched by
  `factor`, shorter than original_max_len / high_freq_factor kept, and the band between
  interpolated smoothly."""
  inv_freq = 1.0 / timescale_H2
  wavelen = 2 * math.pi * timescale_H2
  low_freq_wavelen = original_max_len / low_freq_factor
  high_freq_wavelen = original_max_len / high_freq_factor
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return 1.0 / jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, base: int,
               scale_factor: float = 1.0, llama3: tuple | None = None) -> jax.Array:
  """Split-half rotary embedding as in Gemma and HF's `rotate_half` (not interleaved
  pairs); linear scaling divides the positions by `scale_factor` (Gemma 3 global layers);
  `llama3` = (factor, low_freq_factor, high_freq_factor, original_max_len) rescales the
  frequencies (`llama3_timescale`)."""
  head_dim = x_BxLxNxH.shape[-1]
  fraction = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
  timescale = base ** fraction
  if llama3 is not None:
    timescale = llama3_timescale(timescale, *llama3)
  angle_BxLx1xH2 = (positions_BxL[..., None].astype(jnp.float32) / timescale
                    / scale_factor)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xH2), jnp.cos(angle_BxLx1xH2)
  first, second = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


class Einsum(nn.Module):
  """A weight `w` of `shape` applied with an einsum equation (Gemma's layers.Einsum)."""
  shape: tuple[int, ...]
  fan_in_axes: tuple[int, ...]  # for the init scale only
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    fan_in = math.prod(self.shape[a] for a in self.fan_in_axes)
    w = self.param('w', nn.initializers.normal(fan_in ** -0.5), self.shape, self.param_dtype)
    return jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))


class RMSNorm(nn.Module):
  """Gemma stores the scale as an offset from 1, so a zero-initialised norm is the identity,
  and scales in float32; Llama-layout models store the plain scale (one-initialised) and,
  as HF's LlamaRMSNorm, cast the normalised input back before scaling."""
  param_dtype: str = 'float32'
  plus_one: bool = True
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param('scale', init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (normed * (1 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rms_norm(c: 'ModelConfig', name: str | None = None) -> RMSNorm:
  """The config's RMSNorm (offset convention, epsilon) under `name`."""
  return RMSNorm(c.param_dtype, c.norm_plus_one, c.norm_eps, name=name)


class Embedder(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    self.input_embedding = self.param(
        'input_embedding', nn.initializers.normal(c.embed_dim ** -0.5),
        (c.vocab_size, c.embed_dim), c.param_dtype)
    if not c.tie_embeddings:  # HF's lm_head.weight layout, [V, D].
      self.lm_head = self.param('lm_head', nn.initializers.normal(c.embed_dim ** -0.5),
                                (c.vocab_size, c.embed_dim), c.param_dtype)

  def encode(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = self.input_embedding[tokens_BxL].astype(self.config.dtype)
    if not self.config.scale_embeddings:
      return x_BxLxD
    # Gemma casts sqrt(D) to the activation dtype before multiplying; do the same so bf16
    # runs match its checkpoints bit for bit.
    return x_BxLxD * jnp.sqrt(self.config.embed_dim).astype(x_BxLxD.dtype)

  def decode(self, x_BxLxD: jax.Array) -> jax.Array:
    w_VxD = self.input_embedding if self.config.tie_embeddings else self.lm_head
    # float32 logits even for bf16 activations: log-probs feed the policy gradient and KL.
    return jnp.einsum('BLD,VD->BLV', x_BxLxD, w_VxD.astype(x_BxLxD.dtype),
                      preferred_element_type=jnp.float32)


class Attention(nn.Module):
  config: ModelConfig
  attn_type: str = GLOBAL

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, attn_mask_BxLxS, cache, cache_slot):
    c = self.config
    N, K, D, H = c.num_heads, c.num_kv_heads, c.embed_dim, c.head_dim
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    if K == N:  # Gemma fuses the projections when there is no kv-head sharing.
      q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = Einsum((3, N, D, H), (2,), name='qkv_einsum', **kw)(
          'BLD,CNDH->CBLNH', x_BxLxD)
    else:
      q_BxLxNxH = Einsum((N, D, H), (1,), name='q_einsum', **kw)('BLD,NDH->BLNH', x_BxLxD)
      k_BxLxKxH, v_BxLxKxH = Einsum((2, K, D, H), (2,), name='kv_einsum', **kw)(
          'BLD,CKDH->CBLKH', x_BxLxD)
    if c.qkv_bias:  # Qwen2: same layouts as the projections' outputs.
      zeros = nn.initializers.zeros_init()
      if K == N:
        b_3xNxH = self.param('qkv_bias', zeros, (3, N, H), c.param_dtype).astype(c.dtype)
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = (
            q_BxLxNxH + b_3xNxH[0], k_BxLxKxH + b_3xNxH[1], v_BxLxKxH + b_3xNxH[2])
      else:
        b_NxH = self.param('q_bias', zeros, (N, H), c.param_dtype).astype(c.dtype)
        b_2xKxH = self.param('kv_bias', zeros, (2, K, H), c.param_dtype).astype(c.dtype)
        q_BxLxNxH = q_BxLxNxH + b_NxH
        k_BxLxKxH, v_BxLxKxH = k_BxLxKxH + b_2xKxH[0], v_BxLxKxH + b_2xKxH[1]
    q_BxLxNxH = constrain(q_BxLxNxH, DATA_AXIS, None, MODEL_AXIS, None)
    k_BxLxKxH = constrain(k_BxLxKxH, DATA_AXIS, None, MODEL_AXIS, None)
    v_BxLxKxH = constrain(v_BxLxKxH, DATA_AXIS, None, MODEL_AXIS, None)
    if c.use_qk_norm:  # Gemma 3, Qwen3: before rotary, as in their references.
      q_BxLxNxH = rms_norm(c, '_query_norm')(q_BxLxNxH)
      k_BxLxKxH = rms_norm(c, '_key_norm')(k_BxLxKxH)
    local = self.attn_type == LOCAL
    rope_base = c.local_rope_base if local else c.rope_base
    rope_scale = 1.0 if local else c.rope_scale_factor
    llama3 = None if local or c.rope_llama3_factor is None else (
        c.rope_llama3_factor, c.rope_llama3_low_freq_factor, c.rope_llama3_high_freq_factor,
        c.rope_llama3_original_max_len)
    query_scale = (c.query_pre_attn_scalar or H) ** -0.5
    q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, rope_base, rope_scale,
                           llama3) * jnp.asarray(query_scale, c.dtype)
    k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, rope_base, rope_scale, llama3)
    k_BxKxLxH = k_BxLxKxH.transpose(0, 2, 1, 3)
    v_BxKxLxH = v_BxLxKxH.transpose(0, 2, 1, 3)

    if cache is None:
      k_BxKxSxH, v_BxKxSxH, new_cache = k_BxKxLxH, v_BxKxLxH, None
    else:
      k_all = write_slots(cache['k'], k_BxKxLxH.astype(cache['k'].dtype), cache_slot, axis=2)
      v_all = write_slots(cache['v'], v_BxKxLxH.astype(cache['v'].dtype), cache_slot, axis=2)
      new_cache = {'k': k_all, 'v': v_all}
      # Only the first S slots are attended: the mask's width (see Transformer).
      S = attn_mask_BxLxS.shape[-1]
      k_BxKxSxH, v_BxKxSxH = k_all[:, :, :S].astype(c.dtype), v_all[:, :, :S].astype(c.dtype)

    # Query head n shares kv head n // G (Gemma's grouping); the einsum over groups avoids
    # materialising repeated keys.
    B, L = x_BxLxD.shape[:2]
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    logits_BxKxGxLxS = jnp.einsum('BLKGH,BKSH->BKGLS', q_BxLxKxGxH, k_BxKxSxH,
                                  preferred_element_type=jnp.float32)
    logits_BxKxGxLxS = soft_cap(logits_BxKxGxLxS, c.attn_logits_soft_cap)
    logits_BxKxGxLxS = jnp.where(attn_mask_BxLxS[:, None, None], logits_BxKxGxLxS, MASK_VALUE)
    probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(c.dtype)
    out_BxLxKxGxH = jnp.einsum('BKGLS,BKSH->BLKGH', probs, v_BxKxSxH)
    out_BxLxNxH = out_BxLxKxGxH.reshape(B, L, N, H)
    out_BxLxD = Einsum((N, H, D), (0, 1), name='attn_vec_einsum', **kw)(
        'BLNH,NHD->BLD', out_BxLxNxH)
    return out_BxLxD, new_cache


class FeedForward(nn.Module):
  """Gated MLP, act(x W_gate) * (x W_up) W_down: tanh-GELU (Gemma) or SiLU (Llama layout),
  Gemma's param names and layouts."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    D, F = c.embed_dim, c.hidden_dim
    w_2xDxF = self.param('gating_einsum', nn.initializers.normal(D ** -0.5), (2, D, F),
                         c.param_dtype).astype(c.dtype)
    w_FxD = self.param('linear', nn.initializers.normal(F ** -0.5), (F, D),
                       c.param_dtype).astype(c.dtype)
    # 2-D matmuls: XLA:CPU ran the same products on [B,L,D] operands 2x slower (fwd+bwd).
    x_TxD = x_BxLxD.reshape(-1, D)
    gate_TxF = constrain(_ACTIVATIONS[c.mlp_activation](x_TxD @ w_2xDxF[0]), DATA_AXIS,
                         MODEL_AXIS)
    up_TxF = constrain(x_TxD @ w_2xDxF[1], DATA_AXIS, MODEL_AXIS)
    return ((gate_TxF * up_TxF) @ w_FxD).reshape(x_BxLxD.shape)


class Block(nn.Module):
  """Pre-norm residual block; Gemma 2/3 also normalise each branch's output (post-norms)."""
  config: ModelConfig
  attn_type: str = GLOBAL

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, attn_mask_BxLxS, cache, cache_slot):
    c = self.config
    attn_out, new_cache = Attention(c, self.attn_type, name='attn')(
        rms_norm(c, 'pre_attention_norm')(x_BxLxD), positions_BxL, attn_mask_BxLxS,
        cache, cache_slot)
    if c.use_post_attn_norm:
      attn_out = rms_norm(c, 'post_attention_norm')(attn_out)
    x_BxLxD = x_BxLxD + attn_out
    ffw_out = FeedForward(c, name='mlp')(rms_norm(c, 'pre_ffw_norm')(x_BxLxD))
    if c.use_post_ffw_norm:
      ffw_out = rms_norm(c, 'post_ffw_norm')(ffw_out)
    return x_BxLxD + ffw_out, new_cache


class Transformer(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    block_cls = nn.remat(Block) if c.remat else Block
    self.embedder = Embedder(c)
    self.layers = [block_cls(c, attn_type, name=f'layer_{i}')
                   for i, attn_type in enumerate(c.layer_types())]
    self.final_norm = rms_norm(c)

  def __call__(self, tokens_BxL, positions_BxL, attn_mask_BxLxS, cache=None, cache_slot=None,
               return_hidden=False):
    """-> (logits_BxLxV float32 | hidden_BxLxD, new_cache or None).

    With a cache, the L new k/v go to slots [cache_slot, cache_slot + L) (a scalar, or one
    slot per row: `write_slots`) and queries attend over the first S cache slots under
    `attn_mask_BxLxS`, S <= the cache's size: a decode step whose written slots all lie
    below S reads only those (`sampling.live_spans`). Without a cache, S == L. Local
    layers further restrict the mask to the sliding window.
    """
    c = self.config
    if cache is None:
      key_positions_BxS, new_cache = positions_BxL, None
    else:
      key_positions_BxS = write_slots(cache['positions'], positions_BxL.astype(jnp.int32),
                                      cache_slot, axis=1)
      new_cache = {'positions': key_positions_BxS}
      key_positions_BxS = key_positions_BxS[:, :attn_mask_BxLxS.shape[-1]]
    masks = {GLOBAL: attn_mask_BxLxS}
    if LOCAL in c.layer_types():
      masks[LOCAL] = window_mask(attn_mask_BxLxS, positions_BxL, key_positions_BxS,
                                 c.sliding_window_size)
    # The residual stream: batch over `data`, replicated over `model` (see `constrain`).
    x_BxLxD = constrain(self.embedder.encode(tokens_BxL), DATA_AXIS)
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache[f'layer_{i}']
      x_BxLxD, layer_cache = layer(x_BxLxD, positions_BxL, masks[layer.attn_type],
                                   layer_cache, cache_slot)
      x_BxLxD = constrain(x_BxLxD, DATA_AXIS)
      if cache is not None:
        new_cache[f'layer_{i}'] = layer_cache
    hidden_BxLxD = self.final_norm(x_BxLxD)
    if return_hidden:
      return hidden_BxLxD, new_cache
    return self.logits(hidden_BxLxD), new_cache

  def logits(self, hidden_BxLxD):
    """Tied (or `lm_head`) unembedding; float32 logits, soft-capped for Gemma 2."""
    logits_BxLxV = constrain(self.embedder.decode(hidden_BxLxD), DATA_AXIS, None, MODEL_AXIS)
    return soft_cap(logits_BxLxV, self.config.final_logit_soft_cap)
