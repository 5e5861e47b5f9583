"""Orbax checkpoints of a training phase: params, optimizer state and a JSON record.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact; `latest_step` only sees
finished ones. Params are their own item so that evaluation and the next phase restore
them without knowing the optimizer.
"""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def abstract_like(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def latest_step(directory: str) -> Optional[int]:
  """The newest complete step in `directory`, or None (also when it does not exist)."""
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


class Checkpointer:
  """One directory of step checkpoints: save every N steps, keep the last K."""

  def __init__(self, directory: str, every: int = 0, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(every, 1), create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params, opt_state=None, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    items = dict(params=ocp.args.StandardSave(params),
                 meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, step: Optional[int], abstract_params, abstract_opt_state=None):
    """Returns (params, opt_state or None, meta); the step defaults to the latest."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; name the checkpoint that failed.
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} could not be restored (corrupt, incomplete, or "
          f"written for another model config): {type(e).__name__}: {e}") from e
    return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["meta"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
