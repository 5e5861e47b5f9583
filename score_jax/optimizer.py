"""The optimizer: Adam (the paper's), gradient clipping, warmup + cosine for supervised
phases, and a float32 master copy for low-precision params."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterState(NamedTuple):
  master: Any  # float32 copy of the (low-precision) params
  inner: Any  # the wrapped optimizer's state, over the master copy


def with_float32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied to a float32 master copy of bfloat16 params.

  RL steps at lr 5e-6 move a weight by far less than bfloat16's spacing (2^-8 relative),
  so updates applied to bfloat16 params directly round away; the master accumulates them
  and the params are the master rounded. Costs 12 bytes per param (master + 2 moments).
  """
  def init(params):
    master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return MasterState(master, tx.init(master))

  def update(grads, state, params):
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, inner = tx.update(grads, state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    # What takes params to the master: optax.apply_updates adds it and rounds to bf16.
    to_master = jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params)
    return to_master, MasterState(master, inner)

  return optax.GradientTransformation(init, update)


def make_optimizer(learning_rate: float, grad_clip: float, warmup_steps: int = 0,
                   total_steps: int = 0, weight_decay: float = 0.0,
                   float32_master: bool = False) -> optax.GradientTransformation:
  """Adam (the paper's optimizer); warmup + cosine only where total_steps is given (SFT);
  `float32_master` for low-precision params (see `with_float32_master`)."""
  lr = learning_rate
  if total_steps:
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                            max(total_steps, warmup_steps + 1))
  tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(lr, weight_decay=weight_decay))
  return with_float32_master(tx) if float32_master else tx
