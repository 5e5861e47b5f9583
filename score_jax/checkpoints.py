"""Orbax checkpoints of a training phase: params, optimizer state, a JSON record, digests.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact; `latest_step` only sees
finished ones. Params are their own item so that evaluation and the next phase restore
them without knowing the optimizer.

Corruption is refused, not used. Orbax stores arrays in OCDBT data files without
checksums: a flipped byte inside one restores silently as a wrong weight. So every save
also writes `digests` (a JSON item): per array, its shape, dtype and two 32-bit sums
over its bits (`array_digests`), and every restore recomputes them and compares, and
refuses non-finite params. A file that Orbax cannot read (truncated, missing) is traced
to the arrays it holds. Each error names the checkpoint, the array's tree path and what
is wrong.

Multi-host: the digests are a jitted global reduction, so every process computes the
same scalars from its own shards (no process reads another's) and Orbax's JSON handler
writes them from the primary host only. Save and restore are collective: call them on
every process.

Directories may be `gs://` URLs (Orbax goes through etils.epath; reading and writing
them needs `pip install -e .[gcs]`); only local paths are made absolute.
"""
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from score_jax import hosts
from score_jax import sharding

# Hexadecimal golden ratio: decorrelates the second sum from the word positions.
_GOLDEN = 0x9E3779B9
_MAX_NAMED = 8  # arrays listed in one error


class CheckpointError(RuntimeError):
  pass


def resolve_path(path: str) -> str:
  """`path` made absolute if local; a URL (`gs://bucket/run`) is kept as it is."""
  return path if "://" in str(path) else os.path.abspath(path)


def abstract_like(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def latest_step(directory: str) -> Optional[int]:
  """The newest complete step in `directory`, or None (also when it does not exist)."""
  # Process 0's view: opening the directory is collective (Orbax), and another process may
  # be creating it right now.
  if not hosts.agree(epath.Path(resolve_path(directory)).is_dir()):
    return None
  ckpt = Checkpointer(directory)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


# -- digests ------------------------------------------------------------------------------


def _words(x) -> jax.Array:
  """The array's bits as uint32 words: 1-, 2- and 4-byte elements widen to one word each,
  8-byte elements split into two."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size > 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fmix32(h):
  """MurmurHash3's finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _digest_and_nonfinite(x):
  """(uint32[2] digest, int32 count of NaN/inf elements) of one array (see array_digests)."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)  # row-major linear index (mod 2^32)
  for d in range(w.ndim):
    stride = int(np.prod(w.shape[d + 1:])) % 2**32
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
  weighted = jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)
  mixed = jnp.sum(_fmix32(w ^ (index * jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
  else:
    nonfinite = jnp.int32(0)
  return jnp.stack([weighted, mixed]), nonfinite


def array_digests(tree) -> tuple[dict, dict]:
  """({path: 'hhhhhhhh.hhhhhhhh'}, {path: non-finite count}) for every array of `tree`.

  With w_i the array's bits as uint32 words in row-major order (i its linear index):
    sum_i w_i * (2i + 1)                     mod 2^32
    sum_i fmix32(w_i xor (i * 0x9E3779B9))   mod 2^32
  Not cryptographic: it guards against accidents, not an adversary. A change of any one
  word always changes the first sum (an odd factor is invertible mod 2^32); a flipped
  byte, a zeroed or shuffled block or a truncated copy leaves both sums unchanged with
  probability about 2^-64. Integer sums are exact in any order, so the digest does not
  depend on how the array is sharded (a checkpoint restores onto another mesh), and it
  is computed on device by one jitted reduction: each process gets the same replicated
  scalars without reading other hosts' shards.
  """
  leaves = jax.tree.leaves(tree)
  paths = jax.tree.leaves(sharding.tree_paths(tree))
  if not leaves:
    return {}, {}
  first = leaves[0].sharding if isinstance(leaves[0], jax.Array) else None
  out_sharding = (NamedSharding(first.mesh, PartitionSpec())
                  if isinstance(first, NamedSharding) else None)
  results = jax.device_get(jax.jit(
      lambda xs: [_digest_and_nonfinite(x) for x in xs], out_shardings=out_sharding)(leaves))
  hexes = [f"{int(d[0]):08x}.{int(d[1]):08x}" for d, _ in results]
  return dict(zip(paths, hexes)), {p: int(n) for p, (_, n) in zip(paths, results)}


def _record(tree) -> tuple[dict, dict]:
  """The `digests` JSON record of one item ({path: {shape, dtype, digest}}), non-finite counts."""
  digests, nonfinite = array_digests(tree)
  paths = jax.tree.leaves(_paths(tree))
  record = {p: dict(shape=list(np.shape(x)), dtype=str(jnp.dtype(x.dtype)), digest=digests[p])
            for p, x in zip(paths, jax.tree.leaves(tree))}
  return record, nonfinite


def _paths(tree):
  return sharding.tree_paths(tree)


def _listed(items: list[str]) -> str:
  more = f"\n  ... and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else ""
  return "\n  " + "\n  ".join(items[:_MAX_NAMED]) + more


# -- the checkpointer ------------------------------------------------------------------------


class Checkpointer:
  """One directory of step checkpoints: save every N steps, keep the last K."""

  def __init__(self, directory: str, every: int = 0, keep: int = 3):
    self.directory = resolve_path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(every, 1), create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params, opt_state=None, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); refuses non-finite params, so a run that
    diverged stops with the last good checkpoints kept."""
    if not force and not self._manager.should_save(int(step)):
      return False
    trees = dict(params=params) if opt_state is None else dict(params=params, opt_state=opt_state)
    digests = {}
    for name, tree in trees.items():
      digests[name], nonfinite = _record(tree)
      bad = [f"{p}: {n} non-finite values (NaN or inf)" for p, n in nonfinite.items() if n]
      if name == "params" and bad:
        raise CheckpointError(f"refusing to save step {step} to {self.directory}: params hold "
                              f"non-finite values (training diverged?); the last saved "
                              f"checkpoints are kept:{_listed(bad)}")
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items.update(meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
                 digests=ocp.args.JsonSave(digests))
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, step: Optional[int], abstract_params, abstract_opt_state=None):
    """Returns (params, opt_state or None, meta), verified against the saved digests; the
    step defaults to the latest. Arrays come back in the dtypes of the abstract trees."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    where = f"checkpoint {self.directory}/{step}"
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(), digests=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; say what is missing.
      raise CheckpointError(f"{where} has no readable digests record (written before "
                            f"checkpoints carried digests, or its digests/ or meta/ item is "
                            f"missing or corrupt): {_first_line(e)}") from e
    targets = dict(params=abstract_params)
    if abstract_opt_state is not None:
      targets["opt_state"] = abstract_opt_state
    as_saved = {name: self._as_saved(where, name, tree, saved["digests"])
                for name, tree in targets.items()}
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in as_saved.items()}))
    except Exception as e:
      raise CheckpointError(self._unreadable(where, step, as_saved, e)) from e
    bad = [problem for name, tree in out.items()
           for problem in _problems(name, tree, saved["digests"][name])]
    if bad:
      raise CheckpointError(f"{where} is corrupt, refusing to use it:{_listed(bad)}")
    # Cast where the caller asked for another dtype (after verifying the saved bits).
    restored = {name: jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
                                   out[name], targets[name]) for name in targets}
    return restored["params"], restored.get("opt_state"), saved["meta"]

  def _as_saved(self, where, name, abstract, digests):
    """`abstract` with the saved dtypes (the digests are of the saved bits), after checking
    that the checkpoint has this item and every array at the shape asked for."""
    if name not in digests:
      raise CheckpointError(f"{where} has no {name} (saved without it)")
    record = digests[name]
    paths = jax.tree.leaves(_paths(abstract))
    missing = [p for p in paths if p not in record]
    extra = sorted(set(record) - set(paths))
    shapes = [f"{p}: saved {record[p]['shape']}, wanted {list(x.shape)}"
              for p, x in zip(paths, jax.tree.leaves(abstract))
              if p in record and list(x.shape) != record[p]["shape"]]
    if missing or extra or shapes:
      problems = ([f"{p}: not in the checkpoint" for p in missing] +
                  [f"{p}: in the checkpoint, not in the model" for p in extra] + shapes)
      raise CheckpointError(f"{where}: its {name} do not fit this model config (written for "
                            f"another one?):{_listed(problems)}")
    return jax.tree.map(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(record[p]["dtype"]),
                                          sharding=getattr(x, "sharding", None)),
        _paths(abstract), abstract)

  def _unreadable(self, where, step, as_saved, error) -> str:
    """Orbax failed on the whole restore: find which arrays cannot be read, one at a time
    (the others left out as placeholders)."""
    bad = []
    for name, tree in as_saved.items():
      leaves, treedef = jax.tree.flatten(tree)
      for i, path in enumerate(jax.tree.leaves(_paths(tree))):
        def only(fn):
          return jax.tree.unflatten(treedef, [fn(x) if j == i else ocp.PLACEHOLDER
                                              for j, x in enumerate(leaves)])
        try:  # The item's own handler: the manager's is registered for StandardRestore.
          ocp.PyTreeCheckpointer().restore(
              epath.Path(self.directory) / str(step) / name, args=ocp.args.PyTreeRestore(
                  only(lambda x: x), restore_args=only(
                      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype))))
        except Exception as e:  # noqa: BLE001 - any failure marks this array as unreadable
          bad.append(f"{name}/{path}: {_first_line(e)}")
    listed = _listed(bad) if bad else f"\n  (no single array fails) {_first_line(error)}"
    return (f"{where} is corrupt or incomplete (a data file truncated or missing?), refusing "
            f"to use it; unreadable:{listed}")

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _problems(name, tree, record) -> list[str]:
  """What is wrong with each restored array of item `name` against its saved record."""
  digests, nonfinite = array_digests(tree)
  bad = []
  for path, digest in digests.items():
    # Both, where both hold: flipped bytes often decode to NaN too.
    what, saved = [], record[path]["digest"]
    if digest != saved:
      what.append(f"digest {digest} differs from the saved {saved} (its data changed after "
                  "it was written)")
    if name == "params" and nonfinite[path]:
      what.append(f"{nonfinite[path]} non-finite values (NaN or inf)")
    if what:
      bad.append(f"{name}/{path}: " + "; ".join(what))
  return bad


def _first_line(e: Exception) -> str:
  """The error's first line, without TensorStore's spec dump."""
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:300]}"
