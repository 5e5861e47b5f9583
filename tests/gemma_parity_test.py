"""Parity with Hugging Face transformers: Gemma 1 (MQA, MHA), Gemma 2, Gemma 3 text.

For a tiny random model of each variant built in transformers (float32, eager attention),
saved as safetensors and imported with `import_hf`: our logits on a left-padded batch match
HF's on the unpadded rows, our KV-cached greedy sampler continues every prompt exactly as
greedy decoding with HF does, and both still hold after an Orbax round trip. Sequences are
longer than the sliding window, so local layers are exercised in the prefill and the
cached decode. Needs torch + transformers (the test extra).
"""
import json

import jax
import numpy as np
import pytest

import torch  # The test extra installs torch and transformers.
import transformers
torch.set_num_threads(1)  # Tiny models: threads only contend (measured 90x slower on 2 cores).

from score_jax import checkpoints
from score_jax.weights import hf as import_hf
from score_jax import model as model_lib
from score_jax.episodes import left_pad
from sampling_test import sampler  # pytest puts tests/ on sys.path

VOCAB, WIDTH, WINDOW = 256, 64, 8
PROMPTS = [list(range(3, 23)), [7, 9, 200, 31, 5, 77, 128, 250, 2, 64, 19, 3, 8],
           [11, 12, 13, 14, 15, 16, 17]]  # 20, 13, 7 tokens
P, T = 20, 32  # prompt slots; greedy tokens (prompt + answer >> window)
LOGIT_ATOL = 1e-4

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
CAUSAL_LM = {'GemmaConfig': 'GemmaForCausalLM', 'Gemma2Config': 'Gemma2ForCausalLM',
             'Gemma3TextConfig': 'Gemma3ForCausalLM'}


def hf_model(config_class: str, kw: dict, seed: int = 0):
  """A float32 eager-attention HF model with every weight random, norm scales included (at
  their zero init a missing or misplaced norm would go unnoticed)."""
  config = getattr(transformers, config_class)(**kw, attn_implementation='eager')
  torch.manual_seed(seed)
  model = getattr(transformers, CAUSAL_LM[config_class])(config).float().eval()
  with torch.no_grad():
    for name, w in model.named_parameters():
      if 'norm' in name:
        w.normal_(0.0, 0.3)
      elif w.dim() == 2 and 'embed' not in name:  # [out, in]: std 1.5/sqrt(in), so
        w.normal_(0.0, 1.5 * w.shape[1] ** -0.5)  # attention logits reach the caps.
      else:
        w.normal_(0.0, 1.0)
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].numpy()


def hf_greedy(model, prompt, steps) -> list[int]:
  """Greedy with a full HF forward per step; never the pad id, as our sampler."""
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(hf_logits(model, seq)[-1, 1:])) + 1)
  return seq[len(prompt):]


class Ours:
  """Our model on the imported params: jitted forward over the slot layout + the sampler."""

  def __init__(self, config: model_lib.ModelConfig):
    self.model = model_lib.Transformer(config)
    self.sampler = sampler(self.model, T)

    def forward(params, tokens_BxL, valid_BxL):
      return self.model.apply({'params': params}, tokens_BxL,
                              model_lib.positions_from_valid(valid_BxL),
                              model_lib.causal_attention_mask(valid_BxL))[0]
    self.forward = jax.jit(forward)

  def check_against(self, params, hf, want_logits, want_greedy) -> float:
    """Asserts logits and greedy continuations; returns the max abs logit difference."""
    tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
    logits_BxPxV = np.asarray(self.forward(params, tokens_BxP, valid_BxP))
    diff = max(np.abs(logits_BxPxV[b][valid_BxP[b]] - want).max()
               for b, want in enumerate(want_logits))
    assert diff < LOGIT_ATOL, diff
    sample = self.sampler({'params': params}, tokens_BxP, valid_BxP, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sample.tokens_BxT), want_greedy)
    return float(diff)


@pytest.fixture(scope='module', params=list(VARIANTS))
def case(request, tmp_path_factory):
  """(variant, HF model, our model, imported params, HF logits, HF greedy)."""
  config_class, kw = VARIANTS[request.param]
  hf = hf_model(config_class, kw)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path, safe_serialization=True)
  with open(path / 'config.json') as f:
    config = model_lib.ModelConfig(**import_hf.model_config_from_hf(json.load(f)))
  params = import_hf.load_safetensors(str(path), config)
  want_logits = [hf_logits(hf, p) for p in PROMPTS]
  want_greedy = np.array([hf_greedy(hf, p, T) for p in PROMPTS])
  return request.param, hf, Ours(config), params, want_logits, want_greedy


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


def test_logits_and_greedy_match_hf(case):
  _, hf, ours, params, want_logits, want_greedy = case
  diff = ours.check_against(params, hf, want_logits, want_greedy)
  print(f'{case[0]}: max |logit diff| = {diff:.2e}')


def test_orbax_round_trip_keeps_parity(case, tmp_path):
  _, hf, ours, params, want_logits, want_greedy = case
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(0, params, force=True)
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  restored, _, _ = checkpoints.Checkpointer(str(tmp_path / 'ckpt')).restore(0, abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  ours.check_against(restored, hf, want_logits, want_greedy)
