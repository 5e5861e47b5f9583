"""Training: one phase of a recipe at a time, as a loop over one compiled step.

The steps are pure functions of (state, ref_params, batch), jitted once per phase with
explicit shardings and a donated state: `sft_step` (next-token loss) and `rl_step` (the
objective of objective.py, with microbatches). `Setup` holds the mesh, the model and the
parameter layout; `train_phase` runs one phase's loop: it resumes from the phase's own
checkpoint directory, asks episodes.py for a batch each step, writes metrics and
checkpoints, and hands on the phase's params. Which phase runs when, and from which
params, is decided in run.py.
"""
import dataclasses
import functools
import itertools
import os
import threading
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax import checkpoints
from score_jax import episodes as episodes_lib
from score_jax import evaluate
from score_jax import hosts
from score_jax import objective
from score_jax import optimizer
from score_jax import sampling
from score_jax import sft_data
from score_jax import sharding
from score_jax import writers
from score_jax.model import ModelConfig, Transformer, causal_attention_mask, positions_from_valid


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_step(model, tx, chunk, loss_turns, state: TrainState, ref_params, batch):
  """One supervised step on the model tokens of the batch (all attempts, or `loss_turns`)."""
  del ref_params  # Same signature as rl_step; supervised phases have no reference.
  def loss_fn(params):
    logp, _ = objective.token_logprobs(model, params, batch["tokens"], batch["valid"], chunk,
                                       with_entropy=False)
    return objective.sft_loss(logp, batch["turn"], loss_turns)
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


def rl_step(model, tx, chunk, obj: objective.Objective, state: TrainState, ref_params, batch,
            microbatches=1):
  """One RL step: reference log-probs, then the phase's loss and an Adam update.

  `batch`: tokens, valid, turn [B, S], rewards [B, T], optionally onpolicy [B, T] (offline
  first attempts) and kl_scale [T] (adaptive betas). With `microbatches` > 1 the batch is
  processed in that many slices whose gradients are summed (a `lax.scan`), so activation
  memory is that of one slice; advantages come from the whole batch first, so the update
  equals the whole-batch update up to float rounding.
  """
  adv_BxT = objective.advantages(batch["rewards"], obj)
  kl_scale_T = batch.get("kl_scale")

  def grads_of(params, mb):
    tokens, valid, turn = mb["tokens"], mb["valid"], mb["turn"]
    logp_ref, _ = objective.token_logprobs(model, ref_params, tokens, valid, chunk,
                                           with_entropy=False)
    logp_ref = jax.lax.stop_gradient(logp_ref)

    def loss_fn(params):
      logp, entropy = objective.token_logprobs(model, params, tokens, valid, chunk)
      loss, m = objective.rl_loss(logp, logp_ref, turn, mb["rewards"], obj, adv_BxT=mb["adv"],
                                  onpolicy_BxT=mb.get("onpolicy"), kl_scale_T=kl_scale_T)
      return loss, dict(m, entropy=_masked_mean(jax.lax.stop_gradient(entropy), turn > 0))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  full = {k: v for k, v in batch.items() if k != "kl_scale"}
  full["adv"] = adv_BxT
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
    m.update({f"adv{t + 1}_std": adv_BxT[:, t].std() for t in range(obj.turns)})
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), dict(m, grad_norm=optax.global_norm(grads))


class Setup:
  """The mesh, the model and the parameter layout of a run, and how params are made,
  restored and cast (every compiled function places its outputs on these shardings)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    self.model = Transformer(ModelConfig.from_config(config.model))
    self.batch_sh = sharding.batch_sharding(self.mesh)
    hosts.check_layout(self.batch_sh)
    self.repl_sh = sharding.replicated(self.mesh)
    self.abstract_params = jax.eval_shape(lambda: self._init_params(jax.random.key(0)))
    self.param_sh = sharding.param_shardings(self.mesh, self.abstract_params, config.sharding_rules)
    self.float32_master = jnp.dtype(config.model.param_dtype) != jnp.float32

  def _init_params(self, rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    valid = jnp.ones((1, 8), bool)
    return self.model.init(rng, tokens, positions_from_valid(valid),
                           causal_attention_mask(valid))["params"]

  def init_params(self, seed: int):
    return jax.jit(self._init_params, out_shardings=self.param_sh)(hosts.key(seed))

  def restore_params(self, directory: str, step: Optional[int] = None):
    ckpt = checkpoints.Checkpointer(directory)
    try:
      params, _, _ = ckpt.restore(step, checkpoints.abstract_like(self.abstract_params, self.param_sh))
    finally:
      ckpt.close()
    return params

  def as_reference(self, params):
    """The frozen reference: `params` in `config.rl.reference_dtype` (bfloat16 halves its
    memory); it is never given optimizer state."""
    dtype = jnp.dtype(self.config.rl.reference_dtype)
    if all(x.dtype == dtype for x in jax.tree.leaves(params)):
      return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=self.param_sh)(params)

  def state_shardings(self, tx):
    abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
    opt_sh = sharding.follow_params(self.mesh, abstract_opt, self.abstract_params, self.param_sh)
    return TrainState(step=self.repl_sh, params=self.param_sh, opt_state=opt_sh), abstract_opt


# ---------------------------------------------------------------------------------------
# Host-side controllers whose state travels in the checkpoint's JSON record.


@dataclasses.dataclass
class AdaptiveKL:
  """Scales the KL coefficients of the attempts that are not trained so that their KL
  per attempt approaches `target` (the ICLR version's adaptive beta2; Ziegler et al.'s
  proportional controller)."""
  target: float
  rate: float
  anchored: tuple[int, ...]  # 0-based attempts whose coefficient adapts
  scale: float = 1.0

  def scale_T(self, turns: int) -> np.ndarray:
    return np.asarray([self.scale if t in self.anchored else 1.0 for t in range(turns)],
                      np.float32)

  def update(self, metrics):
    kl = float(np.mean([metrics[f"kl{t + 1}"] for t in self.anchored]))
    self.scale *= 1.0 + self.rate * float(np.clip(kl / self.target - 1.0, -0.2, 0.2))


@dataclasses.dataclass
class BestReward:
  """Tracks the mean final-attempt training reward over the last `window` steps; the
  params at its best are the phase's output (the paper's checkpoint selection)."""
  window: int
  history: list = dataclasses.field(default_factory=list)
  best: float = -np.inf

  def improved(self, reward: float) -> bool:
    self.history = (self.history + [float(reward)])[-self.window:]
    mean = float(np.mean(self.history))
    if len(self.history) == self.window and mean > self.best:
      self.best = mean
      return True
    return False


def best_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, f"{name}_best")


# ---------------------------------------------------------------------------------------
# The loop over one phase.


class _Checkpoints:
  """The phase's directory (latest steps, for resume) and, with select=best_reward, the
  best params so far in <name>_best."""

  def __init__(self, setup: Setup, name: str, select_best: bool):
    cfg = setup.config.checkpoint
    self.main = checkpoints.Checkpointer(os.path.join(setup.workdir, name), cfg.every, cfg.keep)
    self.best = checkpoints.Checkpointer(best_dir(setup.workdir, name), keep=1) if select_best else None

  def close(self):
    self.main.close()
    if self.best:
      self.best.close()


def train_phase(setup: Setup, phase, tx, step_fn: Callable, batch_fn: Callable,
                init_params: Callable, ref_params=None, kl: Optional[AdaptiveKL] = None,
                best: Optional[BestReward] = None):
  """Resume, step, log, checkpoint; returns the phase's params (the last, or the best).

  `init_params()` makes the starting params, called only when nothing is saved;
  `step_fn(state, ref_params, batch)` is jitted once with explicit shardings;
  `batch_fn(params, step) -> (batch, host_metrics)` gives step `step`'s batch.
  """
  name, steps = phase.name, phase.steps
  state_sh, abstract_opt = setup.state_shardings(tx)
  ckpt = _Checkpoints(setup, name, best is not None)
  start = ckpt.main.latest_step() or 0
  if start:
    params, opt_state, meta = ckpt.main.restore(
        start, checkpoints.abstract_like(setup.abstract_params, setup.param_sh),
        checkpoints.abstract_like(abstract_opt, state_sh.opt_state))
    if kl is not None:
      kl.scale = meta["kl_scale"]
    if best is not None:
      best.history, best.best = meta["reward_history"], meta["best_reward"]
    print(f"[{name}] resuming from {ckpt.main.directory}/{start}", flush=True)
  else:
    params = init_params()
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
  try:
    if start < steps:
      params = _loop(setup, phase, tx, step_fn, batch_fn, ckpt, start, params, opt_state,
                     state_sh, ref_params, kl, best)
    if best is not None and ckpt.best.latest_step() is not None:
      params = setup.restore_params(ckpt.best.directory)
  finally:
    ckpt.close()
  return params


@dataclasses.dataclass
class _Dispatched:
  """A step whose update is queued on the device and whose metrics are not read yet."""
  step: int
  metrics: Any  # device arrays
  host_metrics: dict
  n_tokens: int
  t_start: float  # when the step's batch began
  t_dispatch: float
  ready: list  # [when the metrics were computed]
  waiter: Optional[threading.Thread]  # appends to `ready` when the host did not wait

  @classmethod
  def of(cls, step, metrics, host_metrics, n_tokens, t_start, t_dispatch, wait: bool):
    if wait:
      jax.block_until_ready(metrics)
      return cls(step, metrics, host_metrics, n_tokens, t_start, t_dispatch, [time.time()], None)
    ready = []
    # Times the update without making the loop wait for it (blocking releases the GIL).
    waiter = threading.Thread(target=lambda: (jax.block_until_ready(metrics),
                                              ready.append(time.time())), daemon=True)
    waiter.start()
    return cls(step, metrics, host_metrics, n_tokens, t_start, t_dispatch, ready, waiter)


def host_waits_for_updates() -> bool:
  """Whether the loop waits for each update before making the next batch. On the CPU
  backend the host's work shares the cores with XLA's own threads, and overlapping it
  showed no gain (0.94-1.08x the demo's SFT step time; README, Benchmarks), so the host
  waits there, as it always did."""
  return jax.default_backend() == "cpu"


def _loop(setup, phase, tx, step_fn, batch_fn, ckpt, start, params, opt_state, state_sh,
          ref_params, kl, best):
  """Step n's metrics are read one step late (as nanodo does): the host makes batch n + 1
  while update n runs (an SFT batch whole; an RL batch up to the sampler, which needs n's
  params; not on the CPU backend, `host_waits_for_updates`), then reads n's metrics, logs
  them and checkpoints n before it queues update n + 1 (which donates n's state).
  The adaptive KL and the best-reward selection still see step n before step n + 1, so a
  run is the same, step for step, as one that waits."""
  cfg, name, steps = setup.config, phase.name, phase.steps
  state = TrainState(hosts.to_global(np.int32(start), setup.repl_sh), params, opt_state)
  ref_sh = None if ref_params is None else setup.param_sh
  jitted = None
  writer = writers.MetricWriter(setup.workdir, name, steps, cfg.log_every, resume_step=start)
  wait = host_waits_for_updates()

  def finish(d: _Dispatched, t_next: float):
    """Logs and checkpoints dispatched step `d`; `state` is still its output."""
    m = jax.device_get(d.metrics)
    if d.waiter:
      d.waiter.join()
    # step_time: from this batch's start to the next one's, so the steps' times add up to
    # the wall time; train_time: from queueing the update until it was computed.
    dt = t_next - d.t_start
    writer.write(d.step + 1, dict(m, **d.host_metrics, step_time=dt,
                                  train_time=d.ready[0] - d.t_dispatch,
                                  tokens_per_s=d.n_tokens / dt))
    meta = dict(phase=name)
    if kl is not None:
      kl.update(m)
      meta["kl_scale"] = kl.scale
    if best is not None:
      if best.improved(m[f"r{phase.turns}"]):
        ckpt.best.save(d.step + 1, state.params, meta=dict(phase=name, best_reward=best.best),
                       force=True)
      meta.update(reward_history=best.history, best_reward=best.best)
    ckpt.main.save(d.step + 1, state.params, state.opt_state, meta, force=d.step + 1 == steps)

  pending = None
  try:
    for step in range(start, steps):
      t0 = time.time()
      try:
        batch, host_metrics = batch_fn(state.params, step)
      except sft_data.NoData as e:  # Finished as it stands, so a rerun does not try again.
        print(e, flush=True)
        if pending:
          finish(pending, time.time())
          pending = None
        ckpt.main.save(steps, state.params, state.opt_state, dict(phase=name, no_data=True),
                       force=True)
        break
      if pending:
        finish(pending, t0)
      if kl is not None:
        batch["kl_scale"] = kl.scale_T(phase.turns)
      if jitted is None:  # The batch's keys decide its shardings: [B, ...] split, the rest not.
        batch_sh = {k: setup.repl_sh if k == "kl_scale" else setup.batch_sh for k in batch}
        # Under the mesh, so the model's activation layout hints apply (sharding.under_mesh).
        jitted = sharding.under_mesh(setup.mesh, jax.jit(
            step_fn, in_shardings=(state_sh, ref_sh, batch_sh),
            out_shardings=(state_sh, setup.repl_sh), donate_argnums=0))
      n_tokens = hosts.sum_scalars(dict(n=int(np.sum(batch["valid"]))))["n"]
      t1 = time.time()
      state, m = jitted(state, ref_params, hosts.to_global(batch, batch_sh))
      pending = _Dispatched.of(step, m, host_metrics, n_tokens, t0, t1, wait)
    if pending:
      finish(pending, time.time())
  finally:
    writer.close()
  return state.params


# ---------------------------------------------------------------------------------------
# Batches of each kind of phase.


def host_metrics(batch: episodes_lib.Batch) -> dict:
  """What the training log shows of a scored batch: reward and accuracy per attempt, the
  self-correction flips, the share of copied attempts, lengths and truncation."""
  s = evaluate.self_correction_metrics(
      batch.rewards_BxT, [batch.attempt_tokens(t) for t in range(batch.turns)],
      batch.truncated_TxB)
  lengths = batch.lengths_TxB()
  out = {k: v for k, v in s.items() if k.startswith("delta")}
  out.update(edit_ratio=s["edit_ratio_mean"], edit_ratio_zero_share=s["edit_ratio_zero_share"],
             correct_given_wrong=s["correct_given_wrong"], edit_ratio_hist=s["edit_ratio_hist"])
  for t in range(batch.turns):
    out.update({f"r{t + 1}": s[f"acc_t{t + 1}"], f"truncated{t + 1}": s[f"truncated_t{t + 1}"],
                f"len{t + 1}": float(np.mean(lengths[t]))})
  return out


def rl_batch_fn(setup: Setup, eps: episodes_lib.Episodes, phase, ref_params):
  """Step `step`'s episodes: problems and random numbers from (seed, phase, step); the last
  `offline_turn1` share of RLOO groups takes its first attempt from the reference.

  Each process samples and scores its share of the groups (hosts.py) and returns its rows
  of the loss batch; the metrics are those of the whole batch, on every process."""
  cfg, rl, r = setup.config, setup.config.rl, setup.config.rollout
  sample_params = sampling.SampleParams.create(r.temperature, r.top_k, r.top_p)
  n_offline = round(phase.cfg.offline_turn1 * rl.num_prompts) * rl.samples_per_prompt
  n_offline //= jax.process_count()  # Each process's share (config_defaults.check).

  def batch_fn(params, step):
    problems = episodes_lib.rl_problems(eps.task, cfg.seed, phase.index, step, rl.num_prompts,
                                        rl.samples_per_prompt)
    mine = hosts.local_share(problems)
    salt = phase.index * 1_000_003 + step
    online = mine[:len(mine) - n_offline]
    # The previous update may still be running (`_loop` reads its metrics one step late):
    # the sampler needs its params, so wait here, and sample_time is the sampler's own.
    jax.block_until_ready(params)
    times = {}  # Scored chunk by chunk while the device samples the next (score_chunks).
    chunks = eps.sample_chunks(params, online, hosts.key(cfg.seed, salt), sample_params,
                               phase.turns, r.batch_size)
    if n_offline:
      t0 = time.perf_counter()
      first = eps.sample(ref_params, mine[len(online):], hosts.key(cfg.seed, salt, 1),
                         sample_params, 1, r.batch_size)
      t_first = time.perf_counter() - t0
      chunks = itertools.chain(chunks, eps.continue_chunks(
          params, first, hosts.key(cfg.seed, salt, 2), sample_params, phase.turns,
          r.batch_size))
    batch = eps.score_chunks(chunks, times)
    if n_offline:
      times["sample_time"] += t_first
    layout = episodes_lib.loss_layout(batch, eps.instr_I)
    if not n_offline:
      del layout["onpolicy"]  # All on-policy: the loss needs no mask.
    whole = episodes_lib.gather(batch, problems)
    new_tokens = float(whole.lengths_TxB().sum())
    metrics = dict(host_metrics(whole), **times,
                   sample_tokens_per_s=new_tokens / times["sample_time"])
    # Cumulative, summed over the hosts' verifiers: a rising count shows hacking.
    metrics.update(hosts.sum_scalars(eps.task.reward_stats()))
    return layout, metrics
  return batch_fn


def rl_phase(setup: Setup, eps, phase, init_params: Callable, ref_params):
  """An RL phase from `init_params()`, held by the KL to `ref_params`."""
  rl, p = setup.config.rl, phase.cfg
  tx = optimizer.make_optimizer(p.learning_rate, rl.grad_clip,
                                float32_master=setup.float32_master)
  step_fn = functools.partial(rl_step, setup.model, tx, rl.logprob_chunk, phase.objective,
                              microbatches=rl.microbatches)
  anchored = tuple(t for t in range(phase.turns) if t + 1 not in phase.objective.train_turns)
  kl = AdaptiveKL(p.kl_target, p.kl_adapt_rate, anchored) if p.kl_target and anchored else None
  best = BestReward(p.select_window) if p.select == "best_reward" else None
  return train_phase(setup, phase, tx, step_fn, rl_batch_fn(setup, eps, phase, ref_params),
                     init_params, ref_params, kl, best)


def sft_phase(setup: Setup, eps, phase, init_params: Callable, rows_fn: Callable):
  """A supervised phase on `rows_fn(params, step) -> [(problem, attempt texts, trained)]`:
  the loss on the attempts marked trained (and in `loss_turns`, when given)."""
  cfg, p = setup.config, phase.cfg
  tx = optimizer.make_optimizer(p.learning_rate, p.grad_clip, p.warmup_steps, p.steps,
                                p.weight_decay, setup.float32_master)
  step_fn = functools.partial(sft_step, setup.model, tx, cfg.rl.logprob_chunk, tuple(p.loss_turns))

  def batch_fn(params, step):
    rows = hosts.local_share(rows_fn(params, step))  # This process's rows.
    layout = episodes_lib.loss_layout(
        eps.transcript_batch([q for q, _, _ in rows], [a for _, a, _ in rows]), eps.instr_I)
    trained_BxT = np.asarray([m for _, _, m in rows], bool)
    turn = layout["turn"]
    keep = np.take_along_axis(trained_BxT, np.maximum(turn - 1, 0), axis=1) & (turn > 0)
    return dict(tokens=layout["tokens"], valid=layout["valid"],
                turn=np.where(keep, turn, 0).astype(np.int32)), {}
  return train_phase(setup, phase, tx, step_fn, batch_fn, init_params)
