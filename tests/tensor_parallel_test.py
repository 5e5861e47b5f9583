"""Tensor parallelism: the sampler and the SCoRe loss agree on meshes 1, 8x1, 4x2 and 2x4.

Params are placed by `sharding.FSDP_TP_RULES` (FSDP over `data`, heads / MLP hidden /
vocabulary over `model`), the batch split over `data`, the model's activation layout
hints on (`sharding.under_mesh`). Greedy tokens must be identical;
log-probs, loss, metrics and gradient within 1e-5 (absolute or relative: float32 sums
in another order). The checks run in a child process with 8 CPU devices (mesh_helpers).
"""
import functools

import mesh_helpers


def test_sampler_and_loss_agree_across_meshes():
  out = mesh_helpers.run_child(__file__)
  print(out[-1500:])


# -- the child: everything below runs with 8 devices ---------------------------------------


def _setup():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from score_jax import model as model_lib

  # Gemma 2 switches on (local/global layers, soft-caps, post-norms); 4 heads and 2 kv
  # heads, so model:4 splits the query heads while the kv heads stay replicated.
  config = model_lib.ModelConfig(
      vocab_size=64, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=8, local_global_pattern=2, sliding_window_size=6, attn_logits_soft_cap=50.0,
      final_logit_soft_cap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True)
  model = model_lib.Transformer(config)
  valid = jnp.ones((1, 4), bool)
  init = functools.partial(model.init, tokens_BxL=jnp.zeros((1, 4), jnp.int32),
                           positions_BxL=model_lib.positions_from_valid(valid),
                           attn_mask_BxLxS=model_lib.causal_attention_mask(valid))
  params = jax.device_get(init(jax.random.key(0))['params'])
  # The reference: the params moved a little, so the KL terms are not zero.
  ref = jax.tree.map(lambda p, q: p + 0.05 * q, params,
                     jax.device_get(init(jax.random.key(1))['params']))

  rng = np.random.default_rng(0)
  B, P, L = 8, 8, 24
  prompt_valid = np.arange(P)[None] >= rng.integers(0, 4, size=(B, 1))  # left-padded
  prompt = np.where(prompt_valid, rng.integers(4, 64, size=(B, P)), 0).astype(np.int32)
  valid = np.arange(L)[None] >= rng.integers(0, 4, size=(B, 1))
  slots = np.arange(L)[None].repeat(B, 0)
  turn = np.where(valid & (slots >= 8), np.where(slots >= 16, 2, 1), 0).astype(np.int32)
  tokens = np.where(valid, rng.integers(4, 64, size=(B, L)), 0).astype(np.int32)
  batch = dict(tokens=tokens, valid=valid, turn=turn,
               rewards=rng.integers(0, 2, size=(B, 2)).astype(np.float32))
  from score_jax import objective
  loss_cfg = objective.Objective(  # Stage II
      turns=2, train_turns=(1, 2), reward_weights=(1.0, 1.0), alpha=10.0,
      kl_coefs=(0.01, 0.01), baselines=('rloo', 'rloo'), rloo_k=4)
  return model, params, ref, (prompt, prompt_valid), batch, loss_cfg


def greedy_tokens(model, spans, params, prompt, prompt_valid, max_new_tokens=10):
  """sampling.start + sampling.decode, greedy (a pure function of its arrays)."""
  import jax
  from score_jax import sampling
  p = {'params': params}
  state = sampling.start(model, p, prompt, prompt_valid,
                         cache_size=prompt.shape[1] + max_new_tokens)
  _, sample = sampling.decode(model, p, state, jax.random.key(0),
                              sampling.SampleParams.create(0.0), max_new_tokens, (),
                              spans=spans)
  return sample.tokens_BxT, sample.logprobs_BxT


def loss_and_grads(model, loss_cfg, chunk, params, ref, batch):
  """objective.token_logprobs for policy and reference, then objective.rl_loss."""
  import jax
  from score_jax import objective
  logp_ref, _ = objective.token_logprobs(model, ref, batch['tokens'], batch['valid'], chunk)

  def loss_fn(p):
    logp, _ = objective.token_logprobs(model, p, batch['tokens'], batch['valid'], chunk)
    return objective.rl_loss(logp, logp_ref, batch['turn'], batch['rewards'], loss_cfg)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


def _child():
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P
  from score_jax import checkpoints
  from score_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  model, params, ref, (prompt, prompt_valid), batch, loss_cfg = _setup()
  rules = sharding.FSDP_TP_RULES
  results = {}
  for shape in mesh_helpers.MESH_SHAPES:
    mesh = mesh_helpers.mesh(shape)
    p, param_sh = mesh_helpers.place(mesh, params, rules)
    r, _ = mesh_helpers.place(mesh, ref, rules)
    batch_sh = sharding.batch_sharding(mesh)
    # Sharded meshes decode over live spans of the 18-slot cache (8, 16, 18), the
    # unsharded reference over the whole cache.
    sample = sharding.under_mesh(mesh, jax.jit(
        functools.partial(greedy_tokens, model, 1 if shape == (1, 1) else 3),
        in_shardings=(param_sh, batch_sh, batch_sh)))(p, prompt, prompt_valid)
    loss = sharding.under_mesh(mesh, jax.jit(
        functools.partial(loss_and_grads, model, loss_cfg, 8),
        in_shardings=(param_sh, param_sh, batch_sh),
        out_shardings=(None, None, param_sh)))(p, r, batch)
    results[shape] = jax.device_get((sample, loss))
    digests = checkpoints.array_digests(p)[0]
    results[shape] += (digests,)
    print(f'mesh {shape}: loss {float(loss[0]):.6f}', flush=True)

  specs = {path: s.spec for path, s in zip(
      jax.tree.leaves(sharding.tree_paths(params)),
      jax.tree.leaves(sharding.param_shardings(mesh_helpers.mesh((2, 4)), params, rules)))}
  assert specs['layer_0/attn/q_einsum/w'] == P('model', 'data', None), specs
  assert specs['layer_0/attn/kv_einsum/w'] == P(None, None, 'data', None), specs  # 2 kv heads
  assert specs['layer_0/mlp/gating_einsum'] == P(None, 'data', 'model'), specs
  assert specs['embedder/input_embedding'] == P('model', 'data'), specs

  (tokens_1, logprobs_1), (loss_1, metrics_1, grads_1), digests_1 = results[(1, 1)]
  assert len({tuple(row) for row in np.asarray(tokens_1)}) > 1, tokens_1  # not degenerate
  for shape, ((tokens, logprobs), (loss, metrics, grads), digests) in results.items():
    np.testing.assert_array_equal(tokens, tokens_1, err_msg=f'greedy tokens on {shape}')
    # 1e-5 absolute or relative: float32 sums in another order (the loss is ~10).
    mesh_helpers.assert_trees_close(logprobs, logprobs_1, 1e-5, f'logprobs on {shape}')
    mesh_helpers.assert_trees_close(loss, loss_1, 1e-5, f'loss on {shape}')
    mesh_helpers.assert_trees_close(metrics, metrics_1, 1e-5, f'metrics on {shape}')
    # The sequence KL weighs each token by the KL still to come (sums of ~10 here), so
    # float32 reductions reordered across meshes differ by up to ~1e-5 relative.
    mesh_helpers.assert_trees_close(grads, grads_1, 5e-5, f'gradient on {shape}')
    assert digests == digests_1, shape  # checkpoint digests do not depend on the layout
  grad_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads_1))))
  assert grad_norm > 1e-3, grad_norm
  print(mesh_helpers.PASSED)


if __name__ == '__main__':
  _child()
