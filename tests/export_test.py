"""Export: a phase checkpoint of each family, written as an HF directory, loads in
transformers and gives our logits; the CLI exports the demo config's model with its
SentencePiece tokenizer; configs no HF architecture computes are refused.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import gemma_parity_test
import llama_parity_test
from hf_parity import Ours
from score_jax import checkpoints
from score_jax import export
from score_jax import model as model_lib
from score_jax.episodes import left_pad
from score_jax import sharding as sharding_lib
from score_jax.weights import hf as hf_lib
from score_jax.weights import hf_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [3, 17, 200, 9, 41, 5, 77, 128, 250, 19, 64]

_VARIANTS = dict(gemma_parity_test.VARIANTS, **llama_parity_test.VARIANTS)
# Qwen2 multi-head: the fused q/k/v biases (the parity variant has grouped heads).
_VARIANTS['qwen2_mha_bias'] = ('Qwen2Config', dict(_VARIANTS['qwen2_bias_tied'][1],
                                                   num_key_value_heads=4))
# Gemma 1 is the CLI test's (the demo model); llama3 scaling changes config.json only,
# which hf_config's round trip covers.
CASES = ['gemma2', 'gemma3', 'llama2_mha_untied', 'qwen2_mha_bias', 'qwen3_qknorm_untied',
         'mistral_window']


def random_params(config: model_lib.ModelConfig, seed=0):
  """Model-initialised params with norm scales and biases moved off their init (zeros or
  ones), where a misplaced one would go unnoticed."""
  valid = np.ones((1, 1), bool)
  params = model_lib.Transformer(config).init(
      jax.random.key(seed), np.zeros((1, 1), np.int32), model_lib.positions_from_valid(valid),
      model_lib.causal_attention_mask(valid))['params']
  rng = np.random.default_rng(seed)
  moved = lambda path, x: np.asarray(x) + (
      rng.normal(0, 0.3, x.shape).astype(np.float32) if 'norm' in path or 'bias' in path else 0)
  return jax.tree.map(moved, sharding_lib.tree_paths(params), params)


def save_phase(params, workdir, phase='stage2', step=3):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, phase))
  ckpt.save(step, params, force=True)
  ckpt.close()


def assert_transformers_matches(out, config, params):
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  prompt = [t % config.vocab_size for t in PROMPT]
  with torch.no_grad():
    want = hf(torch.tensor([prompt])).logits[0].numpy()
  tokens, valid = left_pad([prompt], len(prompt))
  got = np.asarray(Ours(config).forward(params, tokens, valid))[0]
  np.testing.assert_allclose(got, want, atol=1e-4)
  return hf


@pytest.mark.parametrize('name', CASES)
def test_export_loads_in_transformers_with_our_logits(tmp_path, name):
  config_class, kw = _VARIANTS[name]
  hf_json = getattr(transformers, config_class)(**kw).to_dict()
  config = model_lib.ModelConfig(**hf_config.model_config_from_hf(hf_json))
  params = random_params(config)
  save_phase(params, str(tmp_path))
  restored, step = export.restore(str(tmp_path), 'stage2', config)
  assert step == 3
  export.export(restored, config, str(tmp_path / 'out'), tokenizer_path=None)
  hf = assert_transformers_matches(str(tmp_path / 'out'), config, params)
  assert type(hf).__name__ == hf_config._CAUSAL_LM[hf_config.hf_model_type(config)]
  assert hf.config.tie_word_embeddings == config.tie_embeddings
  written = hf_lib.read_header(str(tmp_path / 'out' / 'model.safetensors'))
  assert ('lm_head.weight' in written) == (not config.tie_embeddings)


def test_cli_exports_the_demo_model_and_its_tokenizer(tmp_path):
  from score_jax import config_defaults
  from score_jax import tokenizer as tokenizer_lib
  from score_jax.tasks import arithmetic
  workdir = tmp_path / 'run'
  task = arithmetic.ArithmeticTask()
  tok = tokenizer_lib.Tokenizer.train(task.corpus(np.random.default_rng(0), 2000), 128,
                                      workdir / 'tokenizer.model')
  config = model_lib.ModelConfig.from_config(config_defaults.get_config().model)
  params = random_params(config, seed=1)
  save_phase(params, str(workdir), step=5)
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'score_jax.export', '--config=configs/demo.py',
       f'--workdir={workdir}', '--phase=stage2', f'--out={out}'], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'as gemma' in proc.stdout
  assert_transformers_matches(str(out), config, params)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  text = arithmetic.correct_response(37, 67)
  assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_configs_no_architecture_computes_are_refused():
  base = dict(vocab_size=64, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=2,
              num_kv_heads=1, head_dim=16)
  llama = dict(base, mlp_activation='silu', norm_plus_one=False, scale_embeddings=False)
  for bad, field in [(dict(llama, final_logit_soft_cap=30.0), 'final_logit_soft_cap'),
                     (dict(base, qkv_bias=True), 'qkv_bias'),
                     (dict(base, local_global_pattern=2, sliding_window_size=4,
                           use_post_attn_norm=True, use_post_ffw_norm=True,
                           local_rope_base=1000), 'local_rope_base')]:
    with pytest.raises(hf_config.ExportError, match=field):
      hf_config.hf_config_from_model(model_lib.ModelConfig(**bad))
