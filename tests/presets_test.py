"""Presets of the Llama-layout families against the sizes their model cards publish.

The presets were written from the Hub config.json values without downloading them, so
the parameter count (exact for our tree: `memory.param_count`, pinned to the real arrays
in memory_test) against each model card's published size is the check that a width,
depth, head count, vocabulary or tie was not misremembered.
"""
import pytest

from score_jax import memory
from score_jax import model as model_lib
from score_jax import presets

# Parameters as the Hub model cards state them (safetensors totals).
PUBLISHED = {
    'qwen2_5_0_5b': 0.49e9, 'qwen2_5_1_5b': 1.54e9, 'qwen2_5_7b': 7.61e9,
    'qwen3_0_6b': 0.6e9, 'qwen3_1_7b': 1.7e9, 'qwen3_4b': 4.0e9, 'qwen3_8b': 8.2e9,
    'llama3_2_1b': 1.24e9, 'llama3_2_3b': 3.21e9, 'llama3_1_8b': 8.03e9,
    'smollm2_135m': 134.5e6, 'smollm2_360m': 362e6, 'smollm2_1_7b': 1.71e9,
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_count_is_the_published_size(name):
  config = model_lib.ModelConfig(**presets.get(name))
  count = memory.param_count(config)
  assert abs(count / PUBLISHED[name] - 1) < 0.03, (name, count)


def test_family_switches():
  get = lambda n: model_lib.ModelConfig(**presets.get(n))
  assert get('qwen2_5_7b').qkv_bias and not get('qwen2_5_7b').tie_embeddings
  assert get('qwen3_8b').use_qk_norm and not get('qwen3_8b').qkv_bias
  assert get('llama3_1_8b').rope_llama3_factor == 8.0 and get('llama3_2_1b').rope_llama3_factor == 32.0
  assert get('smollm2_1_7b').num_kv_heads == get('smollm2_1_7b').num_heads  # multi-head
  for name in PUBLISHED:
    c = get(name)
    assert (c.mlp_activation, c.norm_plus_one, c.scale_embeddings) == ('silu', False, False)


@pytest.mark.parametrize('name', presets.NAMES)
def test_exported_config_json_reads_back_and_in_transformers(name):
  """Every preset, Gemma's too: the config.json export writes reads back to the same
  ModelConfig, and transformers builds its config class from it with the same sizes."""
  import transformers
  from score_jax.weights import hf_config
  config = model_lib.ModelConfig(**presets.get(name))
  written = hf_config.hf_config_from_model(config)
  assert model_lib.ModelConfig(**hf_config.model_config_from_hf(written)) == config
  theirs = transformers.AutoConfig.for_model(**written)
  assert type(theirs).__name__.replace('TextConfig', 'Config') == written[
      'architectures'][0].replace('ForCausalLM', 'Config')
  assert model_lib.ModelConfig(**hf_config.model_config_from_hf(theirs.to_dict())) == config
