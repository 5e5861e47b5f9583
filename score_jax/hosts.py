"""Several processes (the hosts of a pod slice), in one place: who owns which rows, how
host data becomes a global array and back, and who writes files.

Each process owns a contiguous share of every batch's rows (whole RLOO groups: the batch
axis is split over the mesh's `data` axis, whose devices are ordered by process). It
samples its rows on its own devices, scores them on its own host (its own verifier
pool) and builds its part of the loss batch; `to_global` assembles the global array
from those parts, `local_rows` reads a process's rows back, and `allgather` collects
what every process needs to see (rewards, tokens, texts: metrics and reports are
computed from the whole batch, the same on every host). With one process each of these
is the identity, and the code path is the same.

These functions are the explicit host<->device copies of the loop: the rest of it runs
under `jax.transfer_guard("disallow")` (tests/hosts_test.py), so a hidden copy (a NumPy
array handed to a jitted function, `np.asarray` of a device array) raises.

All processes must see the same workdir (a gcsfuse mount of a bucket on a pod), as
Orbax's multi-process checkpoints do; only process 0 writes the run's files.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_writer() -> bool:
  """Whether this process writes metrics, reports, transcripts and the tokenizer."""
  return jax.process_index() == 0


def share(n: int) -> slice:
  """This process's rows of a batch of `n` (contiguous, in process order)."""
  count = jax.process_count()
  if n % count:
    raise ValueError(f"a batch of {n} rows does not split over {count} processes")
  per = n // count
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def local_share(items: Sequence) -> list:
  return list(items[share(len(items))])


def check_layout(batch_sharding: jax.sharding.NamedSharding):
  """Raises unless this process's devices hold exactly its `share` of a batch's rows: the
  mesh must list the devices in process order along the data axis (sharding.make_mesh
  does, from `jax.devices()`)."""
  n = batch_sharding.mesh.shape[batch_sharding.spec[0]] if batch_sharding.spec else 1
  rows = {(i[0].start or 0, n if i[0].stop is None else i[0].stop)
          for i in batch_sharding.addressable_devices_indices_map((n,)).values()}
  mine = share(n)
  if sorted(r for a, b in rows for r in range(a, b)) != list(range(mine.start, mine.stop)):
    raise ValueError(f"process {jax.process_index()} of {jax.process_count()} holds rows "
                     f"{sorted(rows)} of the data axis (size {n}), not its share "
                     f"{mine.start}..{mine.stop - 1}: give the data axis a size that is a "
                     "multiple of the process count, ordered by process")


def to_global(tree, shardings) -> Any:
  """Host NumPy of this process (its rows of batch-sharded leaves; the whole value of
  replicated ones) -> global arrays on `shardings` (one, or a tree of them)."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x, s: to_global(x, s), tree, shardings)
  with jax.transfer_guard("allow"):  # Explicit, unlike a NumPy array handed to jit.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(shardings, np.asarray(x)), tree)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array split along its first axis, as host NumPy
  (each row once, though devices of a `model` axis hold copies of it)."""
  if x.ndim == 0:
    return jax.device_get(x)
  by_start = {}
  for shard in x.addressable_shards:
    by_start.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([jax.device_get(by_start[k]) for k in sorted(by_start)])


def allgather(tree) -> Any:
  """Every process's host NumPy leaves, concatenated along axis 0 in process order (each
  process must pass the same shapes)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  with jax.transfer_guard("allow"):
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def allgather_texts(texts: Sequence[str]) -> list[str]:
  """Strings of every process, in process order (as UTF-8 bytes padded to one length)."""
  if jax.process_count() == 1:
    return list(texts)
  raw = [t.encode("utf-8") for t in texts]
  width = int(allgather(np.asarray([max(map(len, raw), default=0)])).max())
  buf = np.zeros((len(raw), max(width, 1)), np.uint8)
  for i, b in enumerate(raw):
    buf[i, :len(b)] = np.frombuffer(b, np.uint8)
  lengths, buf = allgather((np.asarray([len(b) for b in raw]), buf))
  return [bytes(row[:n]).decode("utf-8") for row, n in zip(buf, lengths)]


def sum_scalars(values: dict) -> dict:
  """{name: number} summed over processes (e.g. per-host verifier counters)."""
  if jax.process_count() == 1 or not values:
    return dict(values)
  keys = sorted(values)
  total = allgather(np.asarray([[float(values[k]) for k in keys]])).sum(axis=0)
  return {k: type(values[k])(v) for k, v in zip(keys, total)}


def agree(value: int) -> int:
  """Process 0's `value` (a bool or int), on every process: for decisions read from files
  that another process may be writing at that moment (does a checkpoint exist?), which
  must come out the same everywhere, or the processes' collectives diverge."""
  if jax.process_count() == 1:
    return value
  with jax.transfer_guard("allow"):
    return type(value)(multihost_utils.broadcast_one_to_all(np.int64(value)))


def sync(name: str):
  """Waits until every process gets here (e.g. after process 0 wrote a file they read)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@functools.partial(jax.jit, static_argnums=1)
def _fold(words, n: int):
  key = jax.random.key(words[0])
  for i in range(1, n):
    key = jax.random.fold_in(key, words[i])
  return key


@functools.lru_cache(maxsize=None)
def everywhere() -> jax.sharding.NamedSharding:
  """Replicated on every device of every process (for small values of any mesh)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def key(seed: int, *salts: int) -> jax.Array:
  """`fold_in(...fold_in(key(seed), salts[0])..., salts[-1])`, replicated on every
  device, the same on every process; made on device from an explicit copy of the ints."""
  words = np.asarray([seed, *salts], np.uint32)
  return _fold(to_global(words, everywhere()), len(words))
