"""Parity with Hugging Face transformers: Gemma 1 (MQA, MHA), Gemma 2, Gemma 3 text.

For a tiny random model of each variant built in transformers and imported from its
safetensors (`hf_parity`): our logits on a left-padded batch match HF's, our KV-cached
greedy sampler continues every prompt exactly as HF's `generate` does, and both still hold
after an Orbax round trip. Sequences are longer than the sliding window, so local layers
are exercised in the prefill and the cached decode. Needs torch + transformers (the test
extra).
"""
import pytest

# The two parity tests every family runs, on this module's `case` fixture.
from hf_parity import test_logits_and_greedy_match_hf, test_orbax_round_trip_keeps_parity  # noqa: F401
from hf_parity import VOCAB, WIDTH, build_case
from score_jax import model as model_lib

WINDOW = 8  # < the 20-token prompts + 32 greedy tokens

_COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128,
               num_attention_heads=4, head_dim=16, pad_token_id=0, bos_token_id=2,
               eos_token_id=1, tie_word_embeddings=True)
VARIANTS = {
    'gemma1_mqa': ('GemmaConfig', dict(_COMMON, num_hidden_layers=2, num_key_value_heads=1,
                                       hidden_act='gelu_pytorch_tanh')),
    'gemma1_mha': ('GemmaConfig', dict(_COMMON, num_hidden_layers=2, num_key_value_heads=4,
                                       hidden_act='gelu_pytorch_tanh')),
    # Caps low enough that tanh bends the random model's logits; query scalar != head_dim.
    'gemma2': ('Gemma2Config', dict(_COMMON, num_hidden_layers=4, num_key_value_heads=2,
                                    sliding_window=WINDOW, attn_logit_softcapping=3.0,
                                    final_logit_softcapping=5.0, query_pre_attn_scalar=24)),
    # 6 layers: the 5 local : 1 global pattern; rope 1M + linear x8 on the global layer.
    'gemma3': ('Gemma3TextConfig', dict(
        _COMMON, num_hidden_layers=6, num_key_value_heads=2, sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        rope_parameters={'full_attention': dict(rope_type='linear', factor=8.0,
                                                rope_theta=1_000_000.0),
                         'sliding_attention': dict(rope_type='default', rope_theta=10_000.0)})),
}


@pytest.fixture(scope='module', params=list(VARIANTS))
def case(request, tmp_path_factory):
  """(variant, HF model, our model, imported params, HF logits, HF greedy)."""
  config_class, kw = VARIANTS[request.param]
  return build_case(request.param, config_class, kw, tmp_path_factory.mktemp(request.param))


def test_imported_config_has_the_variant_switches(case):
  name, _, ours, *_ = case
  config = ours.model.config
  types = config.layer_types()
  if name.startswith('gemma1'):
    assert types == (model_lib.GLOBAL,) * 2 and not config.use_post_attn_norm
  elif name == 'gemma2':
    assert types == (model_lib.LOCAL, model_lib.GLOBAL) * 2
    assert (config.attn_logits_soft_cap, config.final_logit_soft_cap) == (3.0, 5.0)
    assert config.sliding_window_size == WINDOW and config.query_pre_attn_scalar == 24
  else:
    assert types == (model_lib.LOCAL,) * 5 + (model_lib.GLOBAL,) and config.use_qk_norm
    assert (config.rope_base, config.local_rope_base) == (1_000_000, 10_000)
    assert config.rope_scale_factor == 8.0 and config.sliding_window_size == WINDOW
