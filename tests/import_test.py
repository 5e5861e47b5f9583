"""HF safetensors import: every array against an independent (inverse) mapping, errors, memory.

The checkpoints are written here: random params in OUR layout are turned into HF tensors
by the inverse of the import mapping (restated with numpy below, from HF's modeling code:
torch Linear weights are [out, in], q/k/v/o heads are the major part of `out`/`in`), so
import(export(params)) == params checks the importer without torch.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from score_jax.weights import hf as import_hf
from score_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, D, F, H, LAYERS = 64, 32, 48, 8, 2


# -- writing checkpoints -------------------------------------------------------------------


def write_safetensors(tensors: dict, file: str):
  """safetensors' own writer where installed, else ours (`test_our_writer_matches_safetensors`
  pins it)."""
  try:
    from safetensors.numpy import save_file
  except ImportError:
    save_file = import_hf.write_safetensors
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file)


def write_checkpoint(tensors: dict, directory: str, num_files: int = 1, config=None):
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  if num_files == 1:
    write_safetensors(tensors, os.path.join(directory, 'model.safetensors'))
  else:
    weight_map = {}
    for j in range(num_files):
      fn = f'model-{j + 1:05d}-of-{num_files:05d}.safetensors'
      part = names[j::num_files]
      write_safetensors({n: tensors[n] for n in part}, os.path.join(directory, fn))
      weight_map.update({n: fn for n in part})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump(dict(metadata={}, weight_map=weight_map), f)
  if config is not None:
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(config, f)
  return directory


# -- our tree, stated from the Gemma reference names, and its HF export ---------------------


def our_tree(variant: str, num_heads: int, num_kv_heads: int) -> dict:
  """Shapes of our params per Gemma's reference tree (the brief's table), by hand."""
  n, k = num_heads, num_kv_heads
  layer = {'pre_attention_norm': {'scale': (D,)}, 'pre_ffw_norm': {'scale': (D,)},
           'mlp': {'gating_einsum': (2, D, F), 'linear': (F, D)},
           'attn': {'attn_vec_einsum': {'w': (n, H, D)}}}
  if n == k:
    layer['attn']['qkv_einsum'] = {'w': (3, n, D, H)}
  else:
    layer['attn']['q_einsum'] = {'w': (n, D, H)}
    layer['attn']['kv_einsum'] = {'w': (2, k, D, H)}
  if variant in ('gemma2', 'gemma3'):
    layer['post_attention_norm'] = {'scale': (D,)}
    layer['post_ffw_norm'] = {'scale': (D,)}
  if variant == 'gemma3':
    layer['attn']['_query_norm'] = {'scale': (H,)}
    layer['attn']['_key_norm'] = {'scale': (H,)}
  tree = {'embedder': {'input_embedding': (V, D)}, 'final_norm': {'scale': (D,)}}
  tree.update({f'layer_{i}': layer for i in range(LAYERS)})
  return tree


def random_params(shapes: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def to_hf(params: dict, variant: str, prefix: str = 'model.') -> dict:
  """Our tree -> HF tensors (the inverse of the import, written independently)."""
  out = {prefix + 'embed_tokens.weight': params['embedder']['input_embedding'],
         prefix + 'norm.weight': params['final_norm']['scale']}
  for i in range(LAYERS):
    p, hf = params[f'layer_{i}'], f'{prefix}layers.{i}.'
    attn = p['attn']
    heads_first = lambda w: w.transpose(0, 2, 1).reshape(-1, D)  # [n,D,H] -> [n*H, D]
    if 'qkv_einsum' in attn:
      q, k, v = attn['qkv_einsum']['w']
    else:
      q, (k, v) = attn['q_einsum']['w'], attn['kv_einsum']['w']
    out[hf + 'self_attn.q_proj.weight'] = heads_first(q)
    out[hf + 'self_attn.k_proj.weight'] = heads_first(k)
    out[hf + 'self_attn.v_proj.weight'] = heads_first(v)
    out[hf + 'self_attn.o_proj.weight'] = attn['attn_vec_einsum']['w'].reshape(-1, D).T
    out[hf + 'mlp.gate_proj.weight'] = p['mlp']['gating_einsum'][0].T
    out[hf + 'mlp.up_proj.weight'] = p['mlp']['gating_einsum'][1].T
    out[hf + 'mlp.down_proj.weight'] = p['mlp']['linear'].T
    out[hf + 'input_layernorm.weight'] = p['pre_attention_norm']['scale']
    if variant == 'gemma1':
      out[hf + 'post_attention_layernorm.weight'] = p['pre_ffw_norm']['scale']
    else:
      out[hf + 'post_attention_layernorm.weight'] = p['post_attention_norm']['scale']
      out[hf + 'pre_feedforward_layernorm.weight'] = p['pre_ffw_norm']['scale']
      out[hf + 'post_feedforward_layernorm.weight'] = p['post_ffw_norm']['scale']
    if variant == 'gemma3':
      out[hf + 'self_attn.q_norm.weight'] = attn['_query_norm']['scale']
      out[hf + 'self_attn.k_norm.weight'] = attn['_key_norm']['scale']
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(variant: str, num_heads: int, num_kv_heads: int) -> dict:
  """A transformers-5 style config.json of the tiny model."""
  c = dict(model_type={'gemma1': 'gemma', 'gemma2': 'gemma2', 'gemma3': 'gemma3_text'}[variant],
           vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
           num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=H,
           rope_parameters=dict(rope_type='default', rope_theta=10_000.0),
           hidden_activation='gelu_pytorch_tanh')
  if variant == 'gemma2':
    c.update(query_pre_attn_scalar=H, attn_logit_softcapping=50.0,
             final_logit_softcapping=30.0, sliding_window=4,
             layer_types=['sliding_attention', 'full_attention'])
  if variant == 'gemma3':
    c.update(query_pre_attn_scalar=H, sliding_window=4,
             layer_types=['sliding_attention', 'full_attention'], rope_parameters=dict(
                 sliding_attention=dict(rope_type='default', rope_theta=10_000.0),
                 full_attention=dict(rope_type='linear', factor=8.0, rope_theta=1e6)))
  return c


def model_for(variant, num_heads, num_kv_heads):
  config = model_lib.ModelConfig(
      **import_hf.model_config_from_hf(hf_config(variant, num_heads, num_kv_heads)))
  return config, import_hf.abstract_params(config)


def shapes_of(tree) -> dict:
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def assert_trees_equal(got, want):
  assert shapes_of(got) == shapes_of(want)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=jax.tree_util.keystr(path))


# -- mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize('variant,num_heads,num_kv_heads,file_dtype,num_files,prefix', [
    ('gemma1', 4, 1, np.float32, 1, 'model.'),              # Gemma 1 2B: multi-query
    ('gemma1', 2, 2, ml_dtypes.bfloat16, 3, 'model.'),      # Gemma 1 7B: fused qkv, bf16, sharded
    ('gemma2', 4, 2, ml_dtypes.bfloat16, 2, 'model.'),      # GQA, post-norms
    ('gemma3', 4, 2, np.float32, 1, 'language_model.model.'),  # QK-norm, multimodal prefix
    ('gemma3', 4, 2, np.float16, 2, 'model.language_model.'),  # transformers >= 4.50 prefix
])
def test_import_matches_inverse_mapping(tmp_path, variant, num_heads, num_kv_heads, file_dtype,
                                        num_files, prefix):
  shapes = our_tree(variant, num_heads, num_kv_heads)
  params = random_params(shapes)
  hf = to_hf(params, variant, prefix)
  hf = {k: v.astype(file_dtype) for k, v in hf.items()}
  if prefix != 'model.':  # The multimodal checkpoint's image tower is skipped, not an error.
    hf['vision_tower.vision_model.embeddings.patch_embedding.weight'] = np.zeros((2, 3), file_dtype)
    hf['multi_modal_projector.mm_input_projection_weight'] = np.zeros((2, 3), file_dtype)
  ckpt = write_checkpoint(hf, str(tmp_path / 'ckpt'), num_files)
  # The values a bf16/f16 file holds, in float32 (exact: both casts are exact on them).
  want = jax.tree.map(lambda x: x.astype(file_dtype).astype(np.float32), params)

  config, model_tree = model_for(variant, num_heads, num_kv_heads)
  assert shapes_of(model_tree) == shapes  # The model's tree is the Gemma reference tree.
  got = import_hf.load_safetensors(ckpt, config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  assert_trees_equal(got, want)


def test_casts_to_param_dtype_and_places_on_sharding(tmp_path):
  shapes = our_tree('gemma1', 4, 1)
  params = random_params(shapes, seed=1)
  hf = to_hf(params, 'gemma1')
  hf['lm_head.weight'] = hf['model.embed_tokens.weight'].copy()  # tied: allowed
  ckpt = write_checkpoint(hf, str(tmp_path / 'ckpt'))
  config = model_lib.ModelConfig(V, D, F, LAYERS, 4, 1, H, param_dtype='bfloat16')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  got = import_hf.load_safetensors(ckpt, config, shardings=sharding)
  assert all(x.dtype == jnp.bfloat16 and x.sharding == sharding for x in jax.tree.leaves(got))
  assert_trees_equal(got, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params))
  # dtype= overrides the config's param_dtype.
  got32 = import_hf.load_safetensors(ckpt, config, dtype='float32')
  assert_trees_equal(got32, params)


# Published Hub config.json files (transformers 4.x generation), abridged to what matters.
GEMMA_2B = dict(model_type='gemma', vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                rope_theta=10000.0, hidden_act='gelu', rms_norm_eps=1e-6)
GEMMA2_9B = dict(model_type='gemma2', vocab_size=256000, hidden_size=3584,
                 intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=4096, final_logit_softcapping=30.0,
                 attn_logit_softcapping=50.0, rope_theta=10000.0,
                 hidden_activation='gelu_pytorch_tanh')
GEMMA3_1B = dict(model_type='gemma3_text', vocab_size=262144, hidden_size=1152,
                 intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=512, sliding_window_pattern=6, rope_theta=1000000,
                 rope_local_base_freq=10000, rope_scaling=None, final_logit_softcapping=None,
                 attn_logit_softcapping=None, hidden_activation='gelu_pytorch_tanh')
GEMMA3_4B = dict(model_type='gemma3', text_config=dict(  # Gemma3ForConditionalGeneration
    model_type='gemma3_text', vocab_size=262208, hidden_size=2560, intermediate_size=10240,
    num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
    rope_theta=1000000.0, rope_local_base_freq=10000.0,
    rope_scaling=dict(rope_type='linear', factor=8.0)))


@pytest.mark.parametrize('hf,preset', [(GEMMA_2B, 'gemma1_2b'), (GEMMA2_9B, 'gemma2_9b'),
                                       (GEMMA3_1B, 'gemma3_1b'), (GEMMA3_4B, 'gemma3_4b')])
def test_model_config_from_hf_matches_presets(hf, preset):
  from score_jax import presets
  got = model_lib.ModelConfig(**import_hf.model_config_from_hf(hf))
  assert got == model_lib.ModelConfig(**presets.get(preset))


def test_model_config_from_hf_reads_both_config_generations():
  """transformers 5 writes rope_parameters/layer_types; 4.x wrote rope_scaling etc."""
  old = dict(GEMMA3_4B['text_config'], num_hidden_layers=8)
  new = {k: v for k, v in old.items() if not k.startswith(('rope', 'sliding_window_'))}
  new.update(layer_types=['sliding_attention'] * 5 + ['full_attention'] + ['sliding_attention'] * 2,
             rope_parameters=dict(
                 sliding_attention=dict(rope_type='default', rope_theta=10000.0),
                 full_attention=dict(rope_type='linear', factor=8.0, rope_theta=1000000.0)))
  got = import_hf.model_config_from_hf(new)
  assert got == import_hf.model_config_from_hf(old)
  assert got['local_global_pattern'] == 6
  assert (got['rope_base'], got['local_rope_base'], got['rope_scale_factor']) == (
      1_000_000, 10_000, 8.0)


@pytest.mark.parametrize('change,match', [
    (dict(model_type='gpt2'), 'gpt2'), (dict(hidden_act='relu'), 'relu'),
    (dict(use_bidirectional_attention=True), 'use_bidirectional_attention'),
    (dict(rope_scaling=dict(rope_type='yarn', factor=4.0)), 'yarn'),
    # The Llama layout: an o_proj bias, Qwen's sliding layers, GELU.
    (dict(model_type='llama', hidden_act='silu', attention_bias=True), 'attention_bias'),
    (dict(model_type='qwen2', hidden_act='silu', use_sliding_window=True), 'use_sliding_window'),
    (dict(model_type='llama'), "hidden_act 'gelu'")])
def test_model_config_from_hf_refuses_what_the_model_cannot_do(change, match):
  with pytest.raises(import_hf.CheckpointImportError, match=match):
    import_hf.model_config_from_hf(dict(GEMMA_2B, **change))


def test_load_config_reads_config_json(tmp_path):
  d = write_checkpoint({}, str(tmp_path / 'c'), config=hf_config('gemma1', 4, 1))
  assert import_hf.load_config(d)['num_kv_heads'] == 1
  with pytest.raises(import_hf.CheckpointImportError, match='no config.json'):
    import_hf.load_config(str(tmp_path))


# -- errors --------------------------------------------------------------------------------


def _gemma1(tmp_path, edit=None, num_files=1):
  params = random_params(our_tree('gemma1', 4, 1))
  hf = to_hf(params, 'gemma1')
  if edit:
    edit(hf)
  ckpt = write_checkpoint(hf, str(tmp_path / 'ckpt'), num_files)
  return ckpt, model_lib.ModelConfig(V, D, F, LAYERS, 4, 1, H)


def test_missing_tensor_is_named(tmp_path):
  ckpt, config = _gemma1(tmp_path, lambda hf: hf.pop('model.layers.1.self_attn.v_proj.weight'))
  with pytest.raises(import_hf.CheckpointImportError,
                     match=r'missing.*model\.layers\.1\.self_attn\.v_proj\.weight \(for our '
                           r'layer_1/attn/kv_einsum/w\)'):
    import_hf.load_safetensors(ckpt, config)


def test_unexpected_tensor_is_named(tmp_path):
  ckpt, config = _gemma1(tmp_path, lambda hf: hf.update(
      {'model.layers.0.pre_feedforward_layernorm.weight': np.zeros(D, np.float32)}))
  with pytest.raises(import_hf.CheckpointImportError,
                     match=r'unexpected.*model\.layers\.0\.pre_feedforward_layernorm\.weight'):
    import_hf.load_safetensors(ckpt, config)


def test_shape_mismatch_names_both_shapes(tmp_path):
  ckpt, config = _gemma1(tmp_path, lambda hf: hf.update(
      {'model.layers.0.mlp.down_proj.weight': np.zeros((D, F + 1), np.float32)}))
  with pytest.raises(import_hf.CheckpointImportError,
                     match=r'model\.layers\.0\.mlp\.down_proj\.weight has shape \[32, 49\], our '
                           r'layer_0/mlp/linear \[48, 32\] needs it to be \[32, 48\]'):
    import_hf.load_safetensors(ckpt, config)


def test_untied_lm_head_is_refused(tmp_path):
  ckpt, config = _gemma1(tmp_path, lambda hf: hf.update(
      {'lm_head.weight': hf['model.embed_tokens.weight'] + 1}))
  with pytest.raises(import_hf.CheckpointImportError, match='lm_head.weight differs'):
    import_hf.load_safetensors(ckpt, config)


def test_missing_files_are_named(tmp_path):
  _, config = _gemma1(tmp_path)
  with pytest.raises(import_hf.CheckpointImportError, match='not found: .*nowhere'):
    import_hf.load_safetensors(str(tmp_path / 'nowhere'), config)
  with pytest.raises(import_hf.CheckpointImportError, match='neither model.safetensors'):
    import_hf.load_safetensors(str(tmp_path), config)
  ckpt, _ = _gemma1(tmp_path / 'sharded', num_files=2)
  os.remove(os.path.join(ckpt, 'model-00002-of-00002.safetensors'))
  with pytest.raises(import_hf.CheckpointImportError, match=r'model-00002-of-00002\.safetensors'):
    import_hf.load_safetensors(ckpt, config)


def test_corrupt_headers_are_named(tmp_path):
  ckpt, config = _gemma1(tmp_path)
  file = os.path.join(ckpt, 'model.safetensors')
  good = open(file, 'rb').read()
  n = int.from_bytes(good[:8], 'little')
  header = json.loads(good[8:8 + n])

  def write(raw):
    with open(file, 'wb') as f:
      f.write(raw)
  write((10 ** 12).to_bytes(8, 'little') + good[8:])
  with pytest.raises(import_hf.CheckpointImportError, match='header length .* exceeds'):
    import_hf.load_safetensors(ckpt, config)
  write(good[:8] + b'{not json' + good[17:])
  with pytest.raises(import_hf.CheckpointImportError, match='not JSON'):
    import_hf.load_safetensors(ckpt, config)
  name = 'model.layers.0.mlp.up_proj.weight'
  header[name]['data_offsets'][1] += 4  # Range no longer matches dtype x shape.
  raw = json.dumps(header).encode()
  write(len(raw).to_bytes(8, 'little') + raw + good[8 + n:])
  with pytest.raises(import_hf.CheckpointImportError, match=f'corrupt header: tensor .{name}'):
    import_hf.load_safetensors(ckpt, config)
  write(good[:-4])  # Data section shorter than the table says.
  with pytest.raises(import_hf.CheckpointImportError, match='corrupt header'):
    import_hf.load_safetensors(ckpt, config)


def test_our_writer_matches_safetensors(tmp_path):
  import safetensors.numpy as st
  tensors = {'b': np.arange(6, dtype=np.float32).reshape(2, 3),
             'a': np.ones((3,), ml_dtypes.bfloat16), 'c': np.full((2, 2), 0.5, np.float16)}
  file = str(tmp_path / 'ours.safetensors')
  import_hf.write_safetensors(tensors, file)
  back = st.load_file(file)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype
    np.testing.assert_array_equal(back[k], v)
  table = import_hf.read_header(file)
  assert table['a'].dtype == ml_dtypes.bfloat16 and table['b'].shape == (2, 3)
  np.testing.assert_array_equal(import_hf.read_tensor(table['c']), tensors['c'])


# -- official Gemma Orbax checkpoints -------------------------------------------------------


def _init_params(config, seed=0):
  """Model-initialised params with random (non-zero) norm scales, as numpy."""
  abstract = import_hf.abstract_params(config)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


def to_released_flat(params: dict) -> dict:
  """The released checkpoints' structure (gemma's `flatten_and_remap_params`, restated):
  one '/'-joined module key under 'transformer/', arrays by name; MLP arrays as 'w'."""
  flat = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in path]
    if names[-2] == 'mlp':
      module, leaf = names, 'w'
    else:
      module, leaf = names[:-1], names[-1]
    flat.setdefault('transformer/' + '/'.join(module), {})[leaf] = x
  return flat


def _save_orbax(tree, directory):
  import orbax.checkpoint as ocp
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(directory, tree)
  return directory


def _gemma_config(variant, **kw):
  return model_lib.ModelConfig(**dict(import_hf.model_config_from_hf(hf_config(variant, 4, 2)),
                                      **kw))


def test_orbax_nested_layout_round_trips_exactly(tmp_path):
  from score_jax.weights import gemma as import_gemma
  config = _gemma_config('gemma3')
  params = _init_params(config)
  ckpt = _save_orbax({'transformer': params}, str(tmp_path / 'nested'))
  got = import_gemma.load_checkpoint(ckpt, config)
  assert_trees_equal(got, params)
  # Without the 'transformer' root (the model.init() structure) too.
  ckpt = _save_orbax(params, str(tmp_path / 'bare'))
  assert_trees_equal(import_gemma.load_checkpoint(ckpt, config), params)


def test_orbax_released_flat_layout(tmp_path):
  """bf16 arrays, [2,F,D] gating (Gemma 2 9B/27B, Gemma 3), padded vocab, image tower."""
  from score_jax.weights import gemma as import_gemma
  config = _gemma_config('gemma2')
  params = _init_params(config, seed=3)
  flat = to_released_flat(jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params))
  for i in range(LAYERS):
    key = f'transformer/layer_{i}/mlp/gating_einsum'
    flat[key]['w'] = np.ascontiguousarray(flat[key]['w'].transpose(0, 2, 1))
  emb = flat['transformer/embedder']['input_embedding']
  flat['transformer/embedder']['input_embedding'] = np.concatenate(
      [emb, np.ones((8, D), emb.dtype)])
  flat['transformer/embedder']['mm_input_projection'] = np.ones((3, D), np.float32)
  flat['SigLiPFromPatches_0/siglip_encoder/embedding'] = {'kernel': np.ones((2, 2), np.float32)}
  ckpt = _save_orbax(flat, str(tmp_path / 'flat'))
  want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  with pytest.raises(import_hf.CheckpointImportError, match='72 rows.*truncate_vocab=True'):
    import_gemma.load_checkpoint(ckpt, config)
  got = import_gemma.load_checkpoint(ckpt, config, truncate_vocab=True)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  assert_trees_equal(got, want)
  got16 = import_gemma.load_checkpoint(ckpt, config, truncate_vocab=True, dtype='bfloat16')
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got16))


def test_orbax_errors_name_the_array(tmp_path):
  from score_jax.weights import gemma as import_gemma
  config = _gemma_config('gemma1')
  params = _init_params(config)
  flat = to_released_flat(params)
  del flat['transformer/layer_1/attn/kv_einsum']
  ckpt = _save_orbax(flat, str(tmp_path / 'missing'))
  with pytest.raises(import_hf.CheckpointImportError,
                     match=r'missing.*transformer/layer_1/attn/kv_einsum/w \(for our '
                           r'layer_1/attn/kv_einsum/w\)'):
    import_gemma.load_checkpoint(ckpt, config)
  flat = to_released_flat(params)
  flat['transformer/layer_0/post_ffw_norm'] = {'scale': np.zeros(D, np.float32)}
  ckpt = _save_orbax(flat, str(tmp_path / 'unexpected'))
  with pytest.raises(import_hf.CheckpointImportError,
                     match='unexpected.*transformer/layer_0/post_ffw_norm/scale'):
    import_gemma.load_checkpoint(ckpt, config)
  bad = dict(params, final_norm={'scale': np.zeros(D + 2, np.float32)})
  ckpt = _save_orbax({'transformer': bad}, str(tmp_path / 'shape'))
  with pytest.raises(import_hf.CheckpointImportError,
                     match=r'transformer/final_norm/scale has shape \[34\], our '
                           r'final_norm/scale needs \[32\]'):
    import_gemma.load_checkpoint(ckpt, config)
  with pytest.raises(import_hf.CheckpointImportError, match='directory not found: .*nowhere'):
    import_gemma.load_checkpoint(str(tmp_path / 'nowhere'), config)
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(import_hf.CheckpointImportError, match='empty: the Orbax checkpoint holds no'):
    import_gemma.load_checkpoint(str(tmp_path / 'empty'), config)


# -- streaming: host memory and shardings, in a child process ------------------------------


def test_streaming_peak_host_memory_and_sharded_placement(tmp_path):
  """Peak RSS (ru_maxrss, whole child process) grows by ~1x the file, not 2x.

  What it measures: the child's peak resident set (VmHWM) during the import minus its
  resident set just before (jax started, tree traced; the peak is reset there by writing 5
  to /proc/self/clear_refs, so start-up peaks do not hide the import's); on the CPU backend the imported params themselves are host
  memory, so ~1.0x is the floor and a load-everything-then-convert importer would reach
  >= 2x. Page cache is not RSS, and this importer does not mmap.
  """
  big_layers, d, f = 8, 256, 2048  # ~75 MB float32, largest param 6 MB.
  tensors = _big_checkpoint(big_layers, d, f)
  ckpt = write_checkpoint(tensors, str(tmp_path / 'big'))
  size = os.path.getsize(os.path.join(ckpt, 'model.safetensors'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip())
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), ckpt, str(big_layers),
                         str(d), str(f)], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  ratio = (result['peak'] - result['rss_before']) / size
  print(f'import peak RSS growth {ratio:.2f}x the file size ({size / 1e6:.0f} MB)')
  assert 0.8 < ratio < 1.4, (ratio, result, size)
  assert result['sharded_ok']


def _big_checkpoint(layers, d, f, n=4, k=1, h=64, v=1024):
  rng = np.random.default_rng(0)
  t = {'model.embed_tokens.weight': rng.standard_normal((v, d), np.float32),
       'model.norm.weight': rng.standard_normal(d, np.float32)}
  for i in range(layers):
    hf = f'model.layers.{i}.'
    for name, shape in [('self_attn.q_proj', (n * h, d)), ('self_attn.k_proj', (k * h, d)),
                        ('self_attn.v_proj', (k * h, d)), ('self_attn.o_proj', (d, n * h)),
                        ('mlp.gate_proj', (f, d)), ('mlp.up_proj', (f, d)),
                        ('mlp.down_proj', (d, f)), ('input_layernorm', (d,)),
                        ('post_attention_layernorm', (d,))]:
      t[f'{hf}{name}.weight'] = rng.standard_normal(shape, np.float32)
  return t


def _child(ckpt, layers, d, f):
  """Runs with 4 CPU devices: import, measure, then check a sharded import's shards."""
  from jax.sharding import Mesh
  from score_jax import sharding as sharding_lib
  config = model_lib.ModelConfig(1024, d, f, layers, 4, 1, 64)
  abstract = import_hf.abstract_params(config)
  rss_before = _reset_peak_rss()
  params = import_hf.load_safetensors(ckpt, config, abstract=abstract)
  jax.block_until_ready(params)
  peak = _proc_status_bytes('VmHWM')

  mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4), ('data', 'model'))
  rules = [('.*mlp/gating_einsum', (None, None, 'model')), ('.*mlp/linear', ('model', None)),
           ('.*q_einsum/w', ('model',)), ('.*', ())]
  shardings = sharding_lib.param_shardings(mesh, abstract, rules)
  sharded = import_hf.load_safetensors(ckpt, config, shardings=shardings)
  ok = all(x.sharding == s for x, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)))
  g = sharded['layer_0']['mlp']['gating_einsum']
  ok &= {s.data.shape for s in g.addressable_shards} == {(2, d, f // 4)}
  ok &= all(np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)))

  # Orbax: the released layout's [2,F,D] gating restored onto a [2,D,F] 'model' sharding.
  from score_jax.weights import gemma as import_gemma
  config = _gemma_config('gemma2')
  small = _init_params(config)
  flat = to_released_flat(small)
  for i in range(LAYERS):
    w = flat[f'transformer/layer_{i}/mlp/gating_einsum']['w']
    flat[f'transformer/layer_{i}/mlp/gating_einsum']['w'] = np.ascontiguousarray(
        w.transpose(0, 2, 1))
  ckpt = _save_orbax(flat, os.path.join(os.path.dirname(ckpt), 'orbax'))
  shardings = sharding_lib.param_shardings(mesh, import_hf.abstract_params(config), rules)
  got = import_gemma.load_checkpoint(ckpt, config, shardings=shardings)
  ok &= all(x.sharding == s for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)))
  ok &= {s.data.shape for s in got['layer_0']['mlp']['gating_einsum'].addressable_shards} == {
      (2, D, F // 4)}
  ok &= all(np.array_equal(np.asarray(a), b)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(small)))
  print(json.dumps(dict(rss_before=rss_before, peak=peak, sharded_ok=bool(ok))))


def _proc_status_bytes(field):
  with open('/proc/self/status') as f:
    line = next(l for l in f if l.startswith(field + ':'))
  return int(line.split()[1]) * 1024


def _reset_peak_rss():
  """Resets VmHWM to the current RSS (Linux >= 4.0) and returns it."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return _proc_status_bytes('VmRSS')


if __name__ == '__main__':
  _child(sys.argv[1], *map(int, sys.argv[2:5]))
