"""Published text-model sizes as `ModelConfig` fields: `get('gemma2_9b')`, `get('qwen3_1_7b')`.

Gemma sources, cross-checked field by field:
- [ref] google-deepmind/gemma `gemma/transformer.py`, `TransformerConfig.gemma_2b()` ...
  `gemma3_27b()` (layers, widths, heads, head_dim, hidden_dim, windows, caps, query
  normalisation, rope bases and scale factors, attention patterns).
- [hf] `transformers` 5.23 config classes: `GemmaConfig` defaults are gemma-7b,
  `Gemma2Config` defaults gemma-2-2b (window 4096, caps 50/30, query_pre_attn_scalar 256),
  `Gemma3TextConfig` (rope 1M global / 10k local, pattern 6, vocab 262_208), and the Hub
  `config.json`s they document.
Vocabulary: the Hugging Face checkpoints' sizes, which `import_hf` loads as is: 256_000
(Gemma 1/2), 262_144 (Gemma 3 1B) and 262_208 (Gemma 3 4B/12B/27B: the multimodal
checkpoints' text tower keeps 64 image tokens). Gemma's own Orbax checkpoints pad
differently (256_128 for Gemma 1/2, 262_144 for Gemma 3 [ref]); the pipeline imports them
with `truncate_vocab=True` (extra rows dropped), and a checkpoint with fewer rows than
`vocab_size` needs `--config.model.vocab_size` set to its rows.
Layout: our `mlp/gating_einsum` is always [2, D, F]; [ref] stores it transposed
([2, F, D]) for Gemma 2 9B/27B and Gemma 3 (`transpose_gating_einsum=True`).
"""
_GEMMA2 = dict(  # [ref] gemma2_*: alternating local/global, both caps, both post-norms
    vocab_size=256_000, local_global_pattern=2, sliding_window_size=4096,
    attn_logits_soft_cap=50.0, final_logit_soft_cap=30.0, use_post_attn_norm=True,
    use_post_ffw_norm=True, rope_base=10_000, local_rope_base=10_000)

_GEMMA3 = dict(  # [ref] gemma3_*: 5 local : 1 global, QK-norm, no caps, rope 1M / 10k
    local_global_pattern=6, use_qk_norm=True, use_post_attn_norm=True,
    use_post_ffw_norm=True, rope_base=1_000_000, local_rope_base=10_000)

# Llama-layout families. Written from the Hub `config.json` values of each model as we
# know them (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim, vocab_size, rope_theta, rope_scaling, rms_norm_eps,
# tie_word_embeddings); they could not be downloaded here to compare. What pins them:
# `tests/presets_test.py` checks each parameter count against the size published on the
# model card (within 3%), and SmolLM2-135M against its GGUF file's metadata exactly.
_LLAMA = dict(mlp_activation='silu', norm_plus_one=False, scale_embeddings=False)
_QWEN2 = dict(_LLAMA, qkv_bias=True, rope_base=1_000_000, norm_eps=1e-6, head_dim=64)
_QWEN3 = dict(_LLAMA, use_qk_norm=True, rope_base=1_000_000, norm_eps=1e-6, head_dim=128,
              vocab_size=151_936)
# Llama 3.1 / 3.2: rope_scaling {rope_type: llama3, factor, low_freq_factor 1,
# high_freq_factor 4, original_max_position_embeddings 8192}.
_LLAMA3 = dict(_LLAMA, vocab_size=128_256, rope_base=500_000, norm_eps=1e-5,
               rope_llama3_low_freq_factor=1.0, rope_llama3_high_freq_factor=4.0,
               rope_llama3_original_max_len=8192)
_SMOLLM2 = dict(_LLAMA, vocab_size=49_152, norm_eps=1e-5, head_dim=64)

_PRESETS = {
    # [ref] gemma_2b / [hf] google/gemma-2b: multi-query (1 kv head).
    'gemma1_2b': dict(vocab_size=256_000, embed_dim=2048, hidden_dim=16_384, num_layers=18,
                      num_heads=8, num_kv_heads=1, head_dim=256),
    # [ref] gemma_7b / [hf] GemmaConfig defaults: multi-head -> fused qkv_einsum.
    'gemma1_7b': dict(vocab_size=256_000, embed_dim=3072, hidden_dim=24_576, num_layers=28,
                      num_heads=16, num_kv_heads=16, head_dim=256),
    # [ref] gemma2_2b / [hf] Gemma2Config defaults.
    'gemma2_2b': dict(_GEMMA2, embed_dim=2304, hidden_dim=9216, num_layers=26, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    # [ref] gemma2_9b / [hf] google/gemma-2-9b config.json.
    'gemma2_9b': dict(_GEMMA2, embed_dim=3584, hidden_dim=14_336, num_layers=42,
                      num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    # [ref] gemma2_27b: BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, 4608 / 32 = 144 ([hf] 144).
    'gemma2_27b': dict(_GEMMA2, embed_dim=4608, hidden_dim=36_864, num_layers=46,
                       num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    # [ref] gemma3_1b: window 512, no rope scaling; [hf] google/gemma-3-1b-pt.
    'gemma3_1b': dict(_GEMMA3, vocab_size=262_144, embed_dim=1152, hidden_dim=6 * 1152,
                      num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                      sliding_window_size=512, query_pre_attn_scalar=256),
    # [ref] gemma3_4b: window 1024, global_scale_factor 8; [hf] rope_scaling linear 8.
    'gemma3_4b': dict(_GEMMA3, vocab_size=262_208, embed_dim=2560, hidden_dim=2560 * 8 // 2,
                      num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                      sliding_window_size=1024, rope_scale_factor=8.0, query_pre_attn_scalar=256),
    # [ref] gemma3_12b: embed 30 * 128 = 3840, hidden 15_360.
    'gemma3_12b': dict(_GEMMA3, vocab_size=262_208, embed_dim=3840, hidden_dim=8 * 3840 // 2,
                       num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256,
                       sliding_window_size=1024, rope_scale_factor=8.0, query_pre_attn_scalar=256),
    # [ref] gemma3_27b: BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, 5376 / 32 = 168 ([hf] 168).
    'gemma3_27b': dict(_GEMMA3, vocab_size=262_208, embed_dim=5376, hidden_dim=5376 * 8 // 2,
                       num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128,
                       sliding_window_size=1024, rope_scale_factor=8.0, query_pre_attn_scalar=168),
    # Qwen/Qwen2.5-*: q/k/v biases, rope 1M; the 7B unties its head and pads the vocab.
    'qwen2_5_0_5b': dict(_QWEN2, vocab_size=151_936, embed_dim=896, hidden_dim=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2),
    'qwen2_5_1_5b': dict(_QWEN2, vocab_size=151_936, embed_dim=1536, hidden_dim=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128),
    'qwen2_5_7b': dict(_QWEN2, vocab_size=152_064, embed_dim=3584, hidden_dim=18_944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                       tie_embeddings=False),
    # Qwen/Qwen3-*: QK-norm, head_dim 128 whatever the width, no biases.
    'qwen3_0_6b': dict(_QWEN3, embed_dim=1024, hidden_dim=3072, num_layers=28, num_heads=16,
                       num_kv_heads=8),
    'qwen3_1_7b': dict(_QWEN3, embed_dim=2048, hidden_dim=6144, num_layers=28, num_heads=16,
                       num_kv_heads=8),
    'qwen3_4b': dict(_QWEN3, embed_dim=2560, hidden_dim=9728, num_layers=36, num_heads=32,
                     num_kv_heads=8),
    'qwen3_8b': dict(_QWEN3, embed_dim=4096, hidden_dim=12_288, num_layers=36, num_heads=32,
                     num_kv_heads=8, tie_embeddings=False),
    # meta-llama/Llama-3.2-1B, -3B (tied, llama3 factor 32) and Llama-3.1-8B (untied, 8).
    'llama3_2_1b': dict(_LLAMA3, embed_dim=2048, hidden_dim=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, rope_llama3_factor=32.0),
    'llama3_2_3b': dict(_LLAMA3, embed_dim=3072, hidden_dim=8192, num_layers=28, num_heads=24,
                        num_kv_heads=8, head_dim=128, rope_llama3_factor=32.0),
    'llama3_1_8b': dict(_LLAMA3, embed_dim=4096, hidden_dim=14_336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_llama3_factor=8.0,
                        tie_embeddings=False),
    # HuggingFaceTB/SmolLM2-*: the Llama layout, tied; the 1.7B is multi-head (fused qkv).
    'smollm2_135m': dict(_SMOLLM2, embed_dim=576, hidden_dim=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, rope_base=100_000),
    'smollm2_360m': dict(_SMOLLM2, embed_dim=960, hidden_dim=2560, num_layers=32, num_heads=15,
                         num_kv_heads=5, rope_base=100_000),
    'smollm2_1_7b': dict(_SMOLLM2, embed_dim=2048, hidden_dim=8192, num_layers=24,
                         num_heads=32, num_kv_heads=32, rope_base=130_000),
}

NAMES = tuple(_PRESETS)


def get(name: str) -> dict:
  """ModelConfig fields of a published size (a fresh dict: callers may override dtype etc.)."""
  if name not in _PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {NAMES}')
  return dict(_PRESETS[name])
