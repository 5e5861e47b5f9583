"""Parity with Hugging Face transformers: Llama 2/3, Qwen2, Qwen3, Mistral (SmolLM2 is Llama).

As `gemma_parity_test` (helpers in `hf_parity`): a tiny random model of each family built
in transformers, imported from its safetensors; logits on a left-padded batch within 1e-4,
32 greedy tokens identical to HF's `generate`, and the same after an Orbax round trip.
Between them the variants cover tied and untied heads, multi-head (fused qkv) and
grouped-query attention, q/k/v biases, QK-norm with a head_dim that is not width/heads,
llama3 rotary scaling and a sliding window shorter than the sequence.
"""
import pytest

# The two parity tests every family runs, on this module's `case` fixture.
from hf_parity import test_logits_and_greedy_match_hf, test_orbax_round_trip_keeps_parity  # noqa: F401
from hf_parity import VOCAB, WIDTH, build_case
from score_jax import model as model_lib

WINDOW = 8  # Mistral: < the 20-token prompts + 32 greedy tokens

_COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2)
VARIANTS = {
    # Llama 2: multi-head (our fused qkv_einsum), untied head, plain rotary.
    'llama2_mha_untied': ('LlamaConfig', dict(_COMMON, num_key_value_heads=4, head_dim=16,
                                              tie_word_embeddings=False)),
    # Llama 3.2: GQA, tied, llama3 scaling (head_dim 16, theta 5e5: wavelengths from 6 to
    # 6e5 fall in all three bands around 8192 / {1, 4}).
    'llama3_gqa_tied': ('LlamaConfig', dict(_COMMON, head_dim=16, tie_word_embeddings=True,
                                            max_position_embeddings=131_072,
                                            rope_parameters=dict(
                                                rope_type='llama3', rope_theta=500_000.0,
                                                factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0,
                                                original_max_position_embeddings=8192))),
    # Qwen2.5: q/k/v biases, tied, theta 1e6.
    'qwen2_bias_tied': ('Qwen2Config', dict(_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                            rope_parameters=dict(rope_type='default',
                                                                 rope_theta=1_000_000.0))),
    # Qwen3: QK-norm, untied, head_dim 24 (4 heads x 24 != width 64).
    'qwen3_qknorm_untied': ('Qwen3Config', dict(_COMMON, head_dim=24, tie_word_embeddings=False,
                                                rms_norm_eps=1e-6)),
    # Mistral: every layer slides over WINDOW positions.
    'mistral_window': ('MistralConfig', dict(_COMMON, head_dim=16, sliding_window=WINDOW,
                                             tie_word_embeddings=False)),
}


@pytest.fixture(scope='module', params=list(VARIANTS))
def case(request, tmp_path_factory):
  config_class, kw = VARIANTS[request.param]
  return build_case(request.param, config_class, kw, tmp_path_factory.mktemp(request.param))


def test_imported_config_has_the_family_switches(case):
  name, hf, ours, params, *_ = case
  c = ours.model.config
  assert (c.mlp_activation, c.norm_plus_one, c.scale_embeddings) == ('silu', False, False)
  assert c.tie_embeddings == hf.config.tie_word_embeddings
  assert ('lm_head' in params['embedder']) == (not c.tie_embeddings)
  assert c.qkv_bias == name.startswith('qwen2') and c.use_qk_norm == name.startswith('qwen3')
  assert (c.rope_llama3_factor == 8.0) == (name == 'llama3_gqa_tied')
  if name == 'mistral_window':
    assert c.layer_types() == (model_lib.LOCAL,) * 2 and c.sliding_window_size == WINDOW
  else:
    assert c.layer_types() == (model_lib.GLOBAL,) * 2
  attn = params['layer_0']['attn']
  assert ('qkv_einsum' in attn) == (c.num_kv_heads == c.num_heads)
