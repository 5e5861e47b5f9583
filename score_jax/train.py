"""Training phases: the base model (supervised), SCoRe Stage I and Stage II (RL).

Each phase is a loop over one jitted, donated, explicitly sharded step and owns a
checkpoint directory under the workdir; a restarted run resumes every phase from its
latest checkpoint and skips finished ones. The compiled steps are pure functions of
(state, ref_params, batch); the SCoRe loss itself lives in objective.py.
"""
import functools
import os
import time
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from score_jax import checkpoints
from score_jax import data
from score_jax.tasks import formats
from score_jax import writers
from score_jax import objective
from score_jax import rollout
from score_jax import sampling
from score_jax import sharding
from score_jax.model import ModelConfig, Transformer, causal_attention_mask, positions_from_valid

PHASES = ("base", "stage1", "stage2")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


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


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_step(model, tx, chunk, state: TrainState, ref_params, batch):
  """One supervised step on turn>0 tokens (how the embedded base model is made)."""
  del ref_params  # Same signature as rl_step; the base has no reference.
  def loss_fn(params):
    logp, _ = objective.token_logprobs(model, params, batch["tokens"], batch["valid"], chunk)
    return objective.sft_loss(logp, batch["turn"])
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), dict(loss=loss, grad_norm=optax.global_norm(grads))


def _microbatches(x_BxN, num: int):
  """[B, ...] -> [num, B/num, ...], microbatch i = rows i, i+num, i+2num, ...

  Strided, so each device's contiguous block of the data-sharded batch contributes
  equally to every microbatch and no rows move between devices.
  """
  B = x_BxN.shape[0]
  return jnp.swapaxes(x_BxN.reshape(B // num, num, *x_BxN.shape[1:]), 0, 1)


def rl_step(model, tx, chunk, loss_cfg, state: TrainState, ref_params, batch, microbatches=1):
  """One SCoRe step: reference log-probs, then the stage's loss and an Adam update.

  With `microbatches` > 1 the batch is processed in that many slices whose gradients are
  summed (a `lax.scan`), so activation memory is that of one slice; advantages come from
  the whole batch first, so the update equals the whole-batch update up to float rounding.
  """
  adv_B = objective.advantages(batch["r1"], batch["r2"], loss_cfg.stage, loss_cfg.alpha,
                               loss_cfg.baseline, loss_cfg.rloo_k,
                               loss_cfg.normalize_advantages)

  def grads_of(params, mb):
    tokens, valid, turn = mb["tokens"], mb["valid"], mb["turn"]
    logp_ref, _ = objective.token_logprobs(model, ref_params, tokens, valid, chunk)
    logp_ref = jax.lax.stop_gradient(logp_ref)

    def loss_fn(params):
      logp, entropy = objective.token_logprobs(model, params, tokens, valid, chunk)
      loss, m = objective.score_loss(logp, logp_ref, turn, mb["r1"], mb["r2"], loss_cfg,
                                     adv_B=(mb["a1"], mb["a2"]))
      return loss, dict(m, entropy=_masked_mean(jax.lax.stop_gradient(entropy), turn > 0))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  full = dict(batch, a1=adv_B[0], a2=adv_B[1])
  if microbatches == 1:
    (_, m), grads = grads_of(state.params, full)
  else:
    def body(grads_sum, mb):
      (_, m), g = grads_of(state.params, mb)
      return jax.tree.map(jnp.add, grads_sum, g), m
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, m = jax.lax.scan(body, zeros, jax.tree.map(
        lambda x: _microbatches(x, microbatches), full))
    grads = jax.tree.map(lambda g: g / microbatches, grads)  # float32, as accumulated
    m = jax.tree.map(jnp.mean, m)  # Every slice has B/num episodes: means of means.
    # Advantage statistics of the whole batch, not averages of slice statistics.
    m.update(adv1_std=adv_B[0].std(), adv2_std=adv_B[1].std())
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), dict(m, grad_norm=optax.global_norm(grads))


class Trainer:
  """The edges: mesh, shardings, compiled functions, checkpoints and loops of every phase."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, tok, task,
               fmt: formats.PromptFormat = formats.PromptFormat()):
    self.config, self.workdir, self.tok, self.task, self.fmt = config, workdir, tok, task, fmt
    self.mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    self.model = Transformer(ModelConfig.from_config(config.model))
    self.batch_sh = sharding.batch_sharding(self.mesh)
    self.repl_sh = sharding.replicated(self.mesh)
    self.abstract_params = jax.eval_shape(self._init_params, jax.random.key(0))
    self.param_sh = sharding.param_shardings(self.mesh, self.abstract_params, config.sharding_rules)
    self.instr = data.instruction_ids(tok, fmt, task)
    self.float32_master = jnp.dtype(config.model.param_dtype) != jnp.float32
    self.stop_ids = formats.stop_ids(tok, fmt)
    r = config.rollout
    def two_turn(params, *args):
      return rollout.two_turn(self.model, {"params": params}, *args, max_len_1=r.max_len_1,
                              max_len_2=r.max_len_2, eos_id=tok.eos_id, stop_ids=self.stop_ids)
    self._rollout = sharding.under_mesh(self.mesh, jax.jit(two_turn,
        in_shardings=(self.param_sh, self.batch_sh, self.batch_sh, self.repl_sh, self.repl_sh,
                      self.repl_sh)))

    def one_turn(params, context_BxC, context_valid_BxC, rng, sample_params):
      p = {"params": params}
      state = sampling.start(self.model, p, context_BxC, context_valid_BxC,
                             cache_size=context_BxC.shape[1] + r.max_len_2)
      return sampling.decode(self.model, p, state, rng, sample_params, r.max_len_2,
                             tok.eos_id, self.stop_ids)[1]
    self._one_turn = sharding.under_mesh(self.mesh, jax.jit(one_turn, in_shardings=(
        self.param_sh, self.batch_sh, self.batch_sh, self.repl_sh, self.repl_sh)))

  def _init_params(self, rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    valid = jnp.ones((1, 8), bool)
    return self.model.init(rng, tokens, positions_from_valid(valid),
                           causal_attention_mask(valid))["params"]

  def init_params(self, seed: int):
    return jax.jit(self._init_params, out_shardings=self.param_sh)(jax.random.key(seed))

  # -- phases ----------------------------------------------------------------------------

  def _state_shardings(self, tx):
    abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
    opt_sh = sharding.follow_params(self.mesh, abstract_opt, self.abstract_params, self.param_sh)
    return TrainState(step=self.repl_sh, params=self.param_sh, opt_state=opt_sh), abstract_opt

  def _run_phase(self, name: str, steps: int, tx, init_params, step_fn, batch_fn,
                 ref_params=None):
    """Generic loop: resume, step, log, checkpoint. Returns the phase's final params.

    `init_params` (params, or a function making them) is used only when nothing is saved;
    `step_fn(state, ref_params, batch)` is jitted once with explicit shardings.
    """
    cfg = self.config
    state_sh, abstract_opt = self._state_shardings(tx)
    ckpt = checkpoints.Checkpointer(os.path.join(self.workdir, name), cfg.checkpoint.every,
                                    cfg.checkpoint.keep)
    start = ckpt.latest_step() or 0
    if start:
      params, opt_state, _ = ckpt.restore(
          start, checkpoints.abstract_like(self.abstract_params, self.param_sh),
          checkpoints.abstract_like(abstract_opt, state_sh.opt_state))
      print(f"[{name}] resuming from {ckpt.directory}/{start}", flush=True)
    else:
      # A copy: the state is donated to the step, while `init_params` may also be the
      # frozen reference.
      params = init_params() if callable(init_params) else init_params
      params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_sh)(params)
      opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    if start >= steps:
      ckpt.close()
      return params
    state = TrainState(jax.device_put(jnp.asarray(start, jnp.int32), self.repl_sh), params, opt_state)
    ref_sh = None if ref_params is None else self.param_sh
    jitted = sharding.under_mesh(self.mesh, jax.jit(
        step_fn, in_shardings=(state_sh, ref_sh, self.batch_sh),
        out_shardings=(state_sh, self.repl_sh), donate_argnums=0))
    writer = writers.MetricWriter(self.workdir, name, steps, cfg.log_every, resume_step=start)
    try:
      for step in range(start, steps):
        t0 = time.time()
        batch, host_metrics = batch_fn(state.params, step)
        n_tokens = int(np.sum(batch["valid"]))
        state, m = jitted(state, ref_params, jax.device_put(batch, self.batch_sh))
        m = jax.device_get(m)
        dt = time.time() - t0
        writer.write(step + 1, dict(m, **host_metrics, step_time=dt, tokens_per_s=n_tokens / dt))
        ckpt.save(step + 1, state.params, state.opt_state, dict(phase=name), force=step + 1 == steps)
    finally:
      writer.close()
      ckpt.close()
    return state.params

  def train_base(self):
    """Supervised base model from the task's transcripts (second attempt = fresh retry)."""
    cfg, b = self.config, self.config.base
    tx = make_optimizer(b.learning_rate, 1.0, b.warmup_steps, b.steps, b.weight_decay,
                        self.float32_master)
    step_fn = functools.partial(sft_step, self.model, tx, cfg.rl.logprob_chunk)
    r = cfg.rollout

    def batch_fn(params, step):
      rng = np.random.default_rng([cfg.seed, 0, step])
      return data.sft_batch(self.tok, self.fmt, self.task, rng, b.batch_size, r.max_prompt_len,
                            r.max_len_1, r.max_len_2), {}
    return self._run_phase("base", b.steps, tx, lambda: self.init_params(cfg.seed), step_fn,
                           batch_fn)

  def train_stage(self, stage: int, init_params, ref_params):
    """SCoRe Stage I (stage=1) or Stage II (stage=2) from `init_params`, KL to `ref_params`."""
    cfg, rl = self.config, self.config.rl
    st = cfg.stage1 if stage == 1 else cfg.stage2
    loss_cfg = ml_collections.ConfigDict(dict(
        stage=stage, alpha=st.get("alpha", 0.0), beta1=st.beta1, beta2=st.get("beta2", st.beta1),
        kl_estimator=rl.kl_estimator, baseline=rl.baseline, rloo_k=rl.samples_per_prompt,
        normalize_advantages=rl.normalize_advantages))
    tx = make_optimizer(st.learning_rate, rl.grad_clip, float32_master=self.float32_master)
    step_fn = functools.partial(rl_step, self.model, tx, rl.logprob_chunk, loss_cfg,
                                microbatches=rl.microbatches)
    r = cfg.rollout
    sample_params = sampling.SampleParams.create(r.temperature, r.top_k, r.top_p)

    def batch_fn(params, step):
      problems = data.rl_problems(self.task, cfg.seed, stage, step, rl.num_prompts,
                                  rl.samples_per_prompt)
      t0 = time.time()
      episode, scored = self.rollout_and_score(
          params, problems, sample_params,
          jax.random.fold_in(jax.random.key(cfg.seed), stage * 1_000_003 + step),
          r.batch_size)
      t_sample = time.time() - t0
      tokens, valid, turn = rollout.episode_sequence(episode, self.instr)
      s = scored["stats"]
      new_tokens = float(np.sum(scored["len1"]) + np.sum(scored["len2"]))
      host = dict(r1=s["acc_t1"], r2=s["acc_t2"], delta=s["delta"], delta_i2c=s["delta_i2c"],
                  delta_c2i=s["delta_c2i"], edit_ratio=s["edit_ratio_mean"],
                  truncated1=s["truncated_t1"], truncated2=s["truncated_t2"],
                  len1=float(np.mean(scored["len1"])), len2=float(np.mean(scored["len2"])),
                  sample_time=t_sample, sample_tokens_per_s=new_tokens / t_sample)
      stats = getattr(self.task, "verifier_stats", None)
      if stats is not None:  # Cumulative: a rising count means verifiers are timing out.
        host.update(verifier_timeouts=stats["timeouts"], verifier_errors=stats["errors"])
      batch = dict(tokens=tokens, valid=valid, turn=turn, r1=scored["r1"], r2=scored["r2"])
      return batch, host
    return self._run_phase(f"stage{stage}", st.steps, tx, init_params, step_fn, batch_fn,
                           ref_params)

  # -- sampling and evaluation -------------------------------------------------------------

  def rollout_and_score(self, params, problems, sample_params, rng, batch_size=0):
    """Two-turn episodes for `problems` and their rewards (host side).

    Sampled `batch_size` problems per call (0 = all at once), which bounds the KV cache;
    rewards are computed once for the whole batch, so verifiers see it all in parallel.
    """
    n = batch_size or len(problems)
    episodes = []
    for start in range(0, len(problems), n):
      prompt, prompt_valid = data.encode_prompts(self.tok, self.fmt, self.task,
                                                 problems[start:start + n],
                                                 self.config.rollout.max_prompt_len)
      key = jax.random.fold_in(rng, start) if start else rng
      episodes.append(jax.device_get(
          self._rollout(params, prompt, prompt_valid, self.instr, key, sample_params)))
    episode = jax.tree.map(lambda *x: np.concatenate(x), *episodes)
    return episode, data.score_episode(self.tok, self.task, problems, episode)

  def second_turns(self, params, contexts: list[list[int]], sample_params, rng):
    """y2 after given contexts [BOS, x1, y1, instruction] (offline repair, MBPP-R)."""
    r = self.config.rollout
    length = r.max_prompt_len + r.max_len_1 + len(self.instr)
    tokens, valid = rollout.left_pad(contexts, length, pad_id=self.tok.pad_id)
    return jax.device_get(self._one_turn(params, tokens, valid, rng, sample_params))

  def as_reference(self, params):
    """The frozen reference: `params` in `config.rl.reference_dtype` (bfloat16 halves its
    memory); it is never given optimizer state."""
    dtype = jnp.dtype(self.config.rl.reference_dtype)
    if all(x.dtype == dtype for x in jax.tree.leaves(params)):
      return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=self.param_sh)(params)

  def restore_params(self, directory: str, step: Optional[int] = None):
    ckpt = checkpoints.Checkpointer(directory)
    try:
      params, _, _ = ckpt.restore(step, checkpoints.abstract_like(self.abstract_params, self.param_sh))
    finally:
      ckpt.close()
    return params
