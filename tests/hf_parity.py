"""Shared by the parity tests: tiny random HF models, and our model checked against them.

For a tiny random model built in transformers (float32, eager attention), saved as
safetensors and imported: our logits on a left-padded batch match HF's on the unpadded
rows, and our KV-cached greedy sampler continues every prompt exactly as HF's `generate`
does (greedy, cached, no EOS stop, the pad id suppressed as our sampler never emits it).
"""
import json

import jax
import numpy as np

import torch  # The test extra installs torch and transformers.
import transformers
torch.set_num_threads(1)  # Tiny models: threads only contend (measured 90x slower on 2 cores).

from sampling_test import sampler  # pytest puts tests/ on sys.path
from score_jax import checkpoints
from score_jax import model as model_lib
from score_jax.episodes import left_pad
from score_jax.weights import hf as import_hf

VOCAB, WIDTH = 256, 64
PROMPTS = [list(range(3, 23)), [7, 9, 200, 31, 5, 77, 128, 250, 2, 64, 19, 3, 8],
           [11, 12, 13, 14, 15, 16, 17]]  # 20, 13, 7 tokens
P, T = 20, 32  # prompt slots; greedy tokens (prompt + answer >> any window)
LOGIT_ATOL = 1e-4
PAD_ID = 0  # sampling.generate's default pad id, never sampled (unless a stop token)


def hf_model(config_class: str, kw: dict, seed: int = 0):
  """A float32 eager-attention HF causal LM with every weight random, norm scales included
  (at their init a missing or misplaced norm would go unnoticed). Gemma stores norm scales
  as offsets from 1, the Llama layout the scale itself, so both are drawn around the
  identity."""
  config = getattr(transformers, config_class)(**kw, attn_implementation='eager')
  torch.manual_seed(seed)
  causal_lm = config_class.replace('TextConfig', 'Config').replace('Config', 'ForCausalLM')
  model = getattr(transformers, causal_lm)(config).float().eval()
  identity = 0.0 if config.model_type.startswith('gemma') else 1.0
  with torch.no_grad():
    for name, w in model.named_parameters():
      if 'norm' in name:
        w.normal_(identity, 0.3)
      elif w.dim() == 2 and 'embed' not in name:  # [out, in]: std 1.5/sqrt(in), so
        w.normal_(0.0, 1.5 * w.shape[1] ** -0.5)  # attention logits reach the caps.
      else:
        w.normal_(0.0, 1.0)
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].numpy()


def hf_greedy(model, prompt, steps) -> list[int]:
  """HF's own cached greedy `generate`, one unpadded prompt at a time."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                         eos_token_id=None, pad_token_id=PAD_ID,
                         suppress_tokens=[PAD_ID])
  return out[0, len(prompt):].tolist()


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

  def check_against(self, params, want_logits, want_greedy) -> float:
    """Asserts logits and greedy continuations; returns the max abs logit difference."""
    tokens_BxP, valid_BxP = left_pad(PROMPTS, P)
    logits_BxPxV = np.asarray(self.forward(params, tokens_BxP, valid_BxP))
    diff = max(np.abs(logits_BxPxV[b][valid_BxP[b]] - want).max()
               for b, want in enumerate(want_logits))
    assert diff < LOGIT_ATOL, diff
    sample = self.sampler({'params': params}, tokens_BxP, valid_BxP, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sample.tokens_BxT), want_greedy)
    return float(diff)


def build_case(name: str, config_class: str, kw: dict, path):
  """(name, HF model, Ours, imported params, HF logits, HF greedy) of one variant."""
  hf = hf_model(config_class, kw)
  hf.save_pretrained(path, safe_serialization=True)
  with open(path / 'config.json') as f:
    config = model_lib.ModelConfig(**import_hf.model_config_from_hf(json.load(f)))
  params = import_hf.load_safetensors(str(path), config)
  want_logits = [hf_logits(hf, p) for p in PROMPTS]
  want_greedy = np.array([hf_greedy(hf, p, T) for p in PROMPTS])
  return name, hf, Ours(config), params, want_logits, want_greedy


# Parity tests shared by the family modules, which import them and define `case`:
# (name, HF model, Ours, imported params, HF logits, HF greedy tokens).


def test_logits_and_greedy_match_hf(case):
  name, _, ours, params, want_logits, want_greedy = case
  diff = ours.check_against(params, want_logits, want_greedy)
  print(f'{name}: max |logit diff| = {diff:.2e}')


def test_orbax_round_trip_keeps_parity(case, tmp_path):
  """Saved with our Checkpointer and restored: the same arrays and the same parity."""
  _, _, ours, params, want_logits, want_greedy = case
  directory = tmp_path / 'ckpt'
  ckpt = checkpoints.Checkpointer(str(directory))
  ckpt.save(0, params, force=True)
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  restored, _, _ = checkpoints.Checkpointer(str(directory)).restore(0, abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  ours.check_against(restored, want_logits, want_greedy)
