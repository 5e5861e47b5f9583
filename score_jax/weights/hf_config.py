"""Hugging Face `config.json` <-> ModelConfig fields, both ways, for every family.

`model_config_from_hf` reads both config generations: transformers < 5 (`rope_theta`,
`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and >= 5
(`rope_parameters`, per attention type for Gemma 3, and `layer_types`). A setting the
model cannot express is an error rather than a silently different network.
`hf_config_from_model` writes the transformers-5 form of the one HF architecture that
computes the same network (`score_jax.export`); reading it back gives the same fields.
"""
import dataclasses

from score_jax import model as model_lib
from score_jax.weights.mapping import CheckpointImportError

GEMMA_TYPES = ('gemma', 'gemma2', 'gemma3', 'gemma3_text')
LLAMA_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')  # SmolLM2 is `llama`
_CAUSAL_LM = {'gemma': 'GemmaForCausalLM', 'gemma2': 'Gemma2ForCausalLM',
              'gemma3_text': 'Gemma3ForCausalLM', 'llama': 'LlamaForCausalLM',
              'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
              'qwen3': 'Qwen3ForCausalLM'}


def model_config_from_hf(config_json: dict) -> dict:
  """ModelConfig field values from an HF `config.json` (Gemma 1/2/3 text or multimodal,
  Llama, Mistral, Qwen2, Qwen3)."""
  c = dict(config_json.get('text_config') or config_json)  # Gemma3ForConditionalGeneration
  model_type = str(c.get('model_type') or config_json.get('model_type', ''))
  if model_type in LLAMA_TYPES:
    return _known_fields(_llama_layout(c, model_type))
  if model_type not in GEMMA_TYPES:
    raise CheckpointImportError(f'config.json model_type {model_type!r} is not supported; '
                                f'supported: {GEMMA_TYPES + LLAMA_TYPES}')
  act = c.get('hidden_activation') or c.get('hidden_act') or 'gelu_pytorch_tanh'
  if act not in ('gelu_pytorch_tanh', 'gelu'):  # Gemma 1's config says "gelu", means tanh.
    raise CheckpointImportError(f'config.json activation {act!r}: Gemma has tanh-GELU only')
  if c.get('use_bidirectional_attention'):
    raise CheckpointImportError('config.json use_bidirectional_attention=True is not supported')
  out = _sizes(c)
  out.update(norm_eps=float(c.get('rms_norm_eps') or 1e-6),
             tie_embeddings=bool(c.get('tie_word_embeddings', True)))
  global_rope, local_rope = _rope(c)
  out.update(_global_rope(global_rope))
  if model_type == 'gemma':
    return _known_fields(out)
  out.update(use_post_attn_norm=True, use_post_ffw_norm=True,
             query_pre_attn_scalar=c.get('query_pre_attn_scalar'),
             attn_logits_soft_cap=c.get('attn_logit_softcapping'),
             final_logit_soft_cap=c.get('final_logit_softcapping'),
             local_global_pattern=_local_global_pattern(c, model_type))
  if out['local_global_pattern']:
    out['sliding_window_size'] = c['sliding_window']
    out['local_rope_base'] = _theta(local_rope)
    if local_rope.get('rope_type', 'default') != 'default':
      raise CheckpointImportError(f'config.json local rotary scaling {local_rope} unsupported')
  if model_type.startswith('gemma3'):
    out['use_qk_norm'] = True
  return _known_fields(out)


def _sizes(c: dict) -> dict:
  num_heads = c['num_attention_heads']
  return dict(vocab_size=c['vocab_size'], embed_dim=c['hidden_size'],
              hidden_dim=c['intermediate_size'], num_layers=c['num_hidden_layers'],
              num_heads=num_heads, num_kv_heads=c.get('num_key_value_heads') or num_heads,
              head_dim=c.get('head_dim') or c['hidden_size'] // num_heads)


def _llama_layout(c: dict, model_type: str) -> dict:
  """Llama / SmolLM2 / Mistral / Qwen2 / Qwen3: SiLU MLP, plain-scale RMSNorm, no embedding
  scale; Qwen2 always has q/k/v biases (and none on o_proj), Qwen3 q/k norms."""
  act = c.get('hidden_act', 'silu')
  if act != 'silu':
    raise CheckpointImportError(f'config.json ({model_type}) hidden_act {act!r}: only silu')
  for key in ('mlp_bias', 'attention_bias', 'use_sliding_window'):
    if c.get(key):  # Llama's attention_bias also biases o_proj, which the model lacks.
      raise CheckpointImportError(f'config.json ({model_type}) {key}=True is not supported')
  out = _sizes(c)
  out.update(mlp_activation='silu', norm_plus_one=False, scale_embeddings=False,
             norm_eps=float(c.get('rms_norm_eps') or 1e-6),
             tie_embeddings=bool(c.get('tie_word_embeddings', False)),
             qkv_bias=model_type == 'qwen2', use_qk_norm=model_type == 'qwen3')
  global_rope, _ = _rope(c)
  out.update(_global_rope(global_rope))
  if model_type == 'mistral' and c.get('sliding_window'):
    out.update(all_layers_local=True, sliding_window_size=int(c['sliding_window']),
               local_rope_base=out['rope_base'])
    if 'rope_scale_factor' in out or 'rope_llama3_factor' in out:
      raise CheckpointImportError('config.json: rotary scaling with a sliding window on '
                                  'every layer is not supported')
  return out


def _theta(rope: dict) -> int:
  """ModelConfig.rope_base is an int; every published theta is one (1e4, 1e5, 5e5, 1e6)."""
  theta = float(rope.get('rope_theta', 10_000))
  if theta != int(theta):
    raise CheckpointImportError(f'config.json rope_theta={theta}: not an integer')
  return int(theta)


def _global_rope(rope: dict) -> dict:
  """rope_base and the scaling fields of the global layers' rotary settings."""
  out = dict(rope_base=_theta(rope))
  kind = rope.get('rope_type', 'default')
  if kind == 'linear':
    out['rope_scale_factor'] = float(rope['factor'])
  elif kind == 'llama3':
    out.update(rope_llama3_factor=float(rope['factor']),
               rope_llama3_low_freq_factor=float(rope['low_freq_factor']),
               rope_llama3_high_freq_factor=float(rope['high_freq_factor']),
               rope_llama3_original_max_len=int(rope['original_max_position_embeddings']))
  elif kind != 'default':
    raise CheckpointImportError(f'config.json rotary scaling {rope}: only linear and llama3')
  return out


def _known_fields(values: dict) -> dict:
  """The values, after checking ModelConfig has each field (names drift; fail clearly)."""
  unknown = set(values) - {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  if unknown:
    raise CheckpointImportError(f'ModelConfig has no field(s) {sorted(unknown)} for this '
                                'checkpoint; hf_config.model_config_from_hf needs updating')
  return values


def _rope(c: dict) -> tuple[dict, dict]:
  """(global, local) rotary settings as {'rope_theta', 'rope_type', 'factor', ...}."""
  params = c.get('rope_parameters')
  if params:  # transformers >= 5
    if 'full_attention' in params:
      return dict(params['full_attention']), dict(params.get('sliding_attention', {}))
    return dict(params), dict(params)
  scaling = dict(c.get('rope_scaling') or {})
  kind = scaling.pop('rope_type', scaling.pop('type', 'default'))
  global_rope = dict(scaling, rope_type=kind, rope_theta=c.get('rope_theta', 10_000))
  local_rope = dict(rope_type='default',
                    rope_theta=c.get('rope_local_base_freq', c.get('rope_theta', 10_000)))
  return global_rope, local_rope


def _local_global_pattern(c: dict, model_type: str) -> int:
  """ModelConfig.local_global_pattern n: layer i is global iff (i + 1) % n == 0 (0: all)."""
  if not c.get('layer_types'):  # transformers 4.x: HF's rule is the same as ours.
    return 2 if model_type == 'gemma2' else int(c.get('sliding_window_pattern', 6))
  types = list(c['layer_types'])
  bad = sorted(set(types) - {'sliding_attention', 'full_attention'})
  if bad:
    raise CheckpointImportError(f'config.json layer_types has unsupported {bad}')
  for n in [0] + list(range(2, len(types) + 2)):
    rule = ['full_attention' if n == 0 or (i + 1) % n == 0 else 'sliding_attention'
            for i in range(len(types))]
    if rule == types:
      return n
  raise CheckpointImportError(f'config.json layer_types {types} is not "every n-th layer '
                              'global", which is all ModelConfig.local_global_pattern can say')


# -- export --------------------------------------------------------------------------------


class ExportError(ValueError):
  """A model config that no supported HF architecture computes (names the field)."""


def hf_model_type(c: model_lib.ModelConfig) -> str:
  """The HF architecture that computes `c`'s network (its config.json `model_type`)."""
  if c.norm_plus_one:
    return ('gemma3_text' if c.use_qk_norm else
            'gemma2' if c.use_post_attn_norm or c.local_global_pattern else 'gemma')
  return ('qwen3' if c.use_qk_norm else 'qwen2' if c.qkv_bias else
          'mistral' if c.all_layers_local else 'llama')


def hf_config_from_model(c: model_lib.ModelConfig, **token_ids) -> dict:
  """A transformers-5 `config.json` for `c` (plus `bos_token_id=...` etc. as given).

  Checked by reading it back: a field of `c` that the chosen architecture cannot express
  (Gemma 2 with two rotary bases, a Llama with soft-caps, ...) raises ExportError naming
  it, rather than writing a config that loads into another network."""
  model_type = hf_model_type(c)
  out = dict(model_type=model_type, architectures=[_CAUSAL_LM[model_type]],
             vocab_size=c.vocab_size, hidden_size=c.embed_dim, intermediate_size=c.hidden_dim,
             num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
             num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
             tie_word_embeddings=c.tie_embeddings, dtype=c.param_dtype, **token_ids)
  rope = dict(rope_type='default', rope_theta=float(c.rope_base))
  if c.rope_scale_factor != 1.0:
    rope.update(rope_type='linear', factor=c.rope_scale_factor)
  if c.rope_llama3_factor is not None:
    rope.update(rope_type='llama3', factor=c.rope_llama3_factor,
                low_freq_factor=c.rope_llama3_low_freq_factor,
                high_freq_factor=c.rope_llama3_high_freq_factor,
                original_max_position_embeddings=c.rope_llama3_original_max_len)
  out['rope_parameters'] = rope
  layer_types = ['full_attention' if t == model_lib.GLOBAL else 'sliding_attention'
                 for t in c.layer_types()]
  if model_type in GEMMA_TYPES:
    out['hidden_activation'] = 'gelu_pytorch_tanh'
  else:
    out.update(hidden_act='silu', attention_bias=False, mlp_bias=False)
  if model_type in ('gemma2', 'gemma3_text'):
    out.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
               attn_logit_softcapping=c.attn_logits_soft_cap,
               final_logit_softcapping=c.final_logit_soft_cap,
               sliding_window=c.sliding_window_size, layer_types=layer_types)
  if model_type == 'gemma3_text':
    out['rope_parameters'] = dict(full_attention=rope, sliding_attention=dict(
        rope_type='default', rope_theta=float(c.local_rope_base)))
  if model_type == 'mistral':
    out['sliding_window'] = c.sliding_window_size
  if model_type in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=False, layer_types=layer_types)
  back = model_lib.ModelConfig(**dict(model_config_from_hf(out), dtype=c.dtype,
                                      param_dtype=c.param_dtype, remat=c.remat))
  bad = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
         if getattr(c, f.name) != getattr(back, f.name)
         and not (f.name == 'query_pre_attn_scalar' and back.query_pre_attn_scalar == c.head_dim
                  and c.query_pre_attn_scalar is None)}
  if bad:
    raise ExportError(f'{_CAUSAL_LM[model_type]} cannot express {bad} (it would load as '
                      f'{ {k: getattr(back, k) for k in bad} }: another network)')
  return out
