"""Device mesh and parameter layout, both read from the config.

Parameters are laid out by regex rules over their '/'-joined tree paths, big_vision
style: the first rule that matches a path gives its `PartitionSpec` (a tuple of mesh-axis
names or None per array dimension). One list in the config says how every parameter is
placed; the optimizer state follows its parameters.
"""
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


# FSDP for our tree (every family): each weight split along the model width D over the `data` axis,
# the same axis the batch is split on; XLA all-gathers a weight where it is used. Norm
# scales are small and replicated.
FSDP_RULES = (
    (r".*embedder/input_embedding", (None, DATA_AXIS)),          # [V, D]
    (r".*embedder/lm_head", (None, DATA_AXIS)),                  # [V, D] (untied heads)
    (r".*attn/q_einsum/w", (None, DATA_AXIS, None)),             # [N, D, H]
    (r".*attn/kv_einsum/w", (None, None, DATA_AXIS, None)),      # [2, K, D, H]
    (r".*attn/qkv_einsum/w", (None, None, DATA_AXIS, None)),     # [3, N, D, H]
    (r".*attn/attn_vec_einsum/w", (None, None, DATA_AXIS)),      # [N, H, D]
    (r".*mlp/gating_einsum", (None, DATA_AXIS, None)),           # [2, D, F]
    (r".*mlp/linear", (None, DATA_AXIS)),                        # [F, D]
    (r".*", ()),
)


def make_mesh(shape: Sequence[int], axes: Sequence[str]) -> Mesh:
  """A mesh over all devices; one entry of `shape` may be -1 (the rest of the devices)."""
  shape, axes = list(shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape {shape} and config.mesh.axes {axes} differ in length")
  if DATA_AXIS not in axes:
    raise ValueError(f"config.mesh.axes {axes} must contain a '{DATA_AXIS}' axis")
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {shape}: at most one entry may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"config.mesh.shape {shape} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"config.mesh.shape {shape} needs {int(np.prod(shape))} devices, have {n}")
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, axes)


def tree_paths(tree) -> Any:
  """Same-structure tree of '/'-joined key paths ('layer_0/attn/q_einsum/w')."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def spec_for(path: str, ndim: int, rules: Sequence[tuple[str, Sequence[Any]]]) -> P:
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      spec = tuple(spec)
      if len(spec) > ndim:
        raise ValueError(f"sharding rule {pattern!r} -> {spec} has more axes than {path} "
                         f"(ndim {ndim})")
      return P(*spec)
  return P()  # Unmatched: replicated.


def param_shardings(mesh: Mesh, abstract_params, rules) -> Any:
  """NamedSharding per parameter from the regex rules (abstract or concrete params)."""
  paths = tree_paths(abstract_params)
  return jax.tree.map(lambda p, x: NamedSharding(mesh, spec_for(p, np.ndim(x), rules)),
                      paths, abstract_params)


def follow_params(mesh: Mesh, abstract_tree, abstract_params, params_shardings) -> Any:
  """Shardings for a tree whose leaves mirror the params (optimizer moments) or not.

  An optimizer-state leaf whose path ends with a parameter's path and has its shape gets
  that parameter's sharding; anything else (Adam's step counter, schedules) is
  replicated. Left implicit, optax's counter lands on device 0 alone.
  """
  paths = jax.tree.leaves(tree_paths(abstract_params))
  by_path = dict(zip(paths, jax.tree.leaves(params_shardings)))
  shapes = dict(zip(paths, (np.shape(x) for x in jax.tree.leaves(abstract_params))))
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    parts = path.split("/")
    for i in range(len(parts)):  # Longest suffix first: the full parameter path.
      sharding = by_path.get("/".join(parts[i:]))
      if sharding is not None and shapes["/".join(parts[i:])] == np.shape(leaf):
        return sharding
    return replicated
  return jax.tree.map(pick, tree_paths(abstract_tree), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]
