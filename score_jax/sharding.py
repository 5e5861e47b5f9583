"""Device mesh and parameter layout, both read from the config.

Parameters are laid out by regex rules over their '/'-joined tree paths, big_vision
style: the first rule that matches a path gives its `PartitionSpec` (a tuple of mesh-axis
names or None per array dimension). One list in the config says how every parameter is
placed; the optimizer state follows its parameters. A mesh axis whose size does not
divide the dimension it is given is dropped for that parameter (replicated along it):
e.g. Gemma 1 2B's single kv head on a `model` axis of 2.

Two rule sets for the Gemma tree (`config.sharding_rules`):
  FSDP_RULES     the model width D over `data`, the batch's axis (ZeRO-3 style).
  FSDP_TP_RULES  D over `data` as above, plus tensor parallelism over `model`: attention
                 heads, MLP hidden units and the vocabulary are split over it, so a
                 weight's two large dimensions are cut both ways. The batch stays split
                 over `data` only (`batch_sharding`); XLA places the activations.
"""
import functools
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


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

# FSDP on `data` and tensor parallelism on `model` (N heads, K kv heads, H head dim,
# F hidden, V vocabulary). Each layer's q/k/v projections and its MLP's gate/up are
# column-parallel (output heads or hidden units over `model`), the attention output and
# MLP down projections row-parallel (their input over `model`): one all-reduce per
# branch, as in Megatron-LM. The tied embedding is split over the vocabulary, so the
# float32 logits of the loss chunks are too. Norm scales are replicated.
FSDP_TP_RULES = (
    (r".*embedder/input_embedding", (MODEL_AXIS, DATA_AXIS)),            # [V, D]
    (r".*attn/q_einsum/w", (MODEL_AXIS, DATA_AXIS, None)),               # [N, D, H]
    (r".*attn/kv_einsum/w", (None, MODEL_AXIS, DATA_AXIS, None)),        # [2, K, D, H]
    (r".*attn/qkv_einsum/w", (None, MODEL_AXIS, DATA_AXIS, None)),       # [3, N, D, H]
    (r".*attn/attn_vec_einsum/w", (MODEL_AXIS, None, DATA_AXIS)),        # [N, H, D]
    (r".*mlp/gating_einsum", (None, DATA_AXIS, MODEL_AXIS)),             # [2, D, F]
    (r".*mlp/linear", (MODEL_AXIS, DATA_AXIS)),                          # [F, D]
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


def fit_to_mesh(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` without the mesh axes whose size does not divide their dimension: a rule
  written for 8 kv heads still places a model with 1."""
  def fits(axes, size):
    names = axes if isinstance(axes, tuple) else (axes,)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
      raise ValueError(f"sharding rule names mesh axes {unknown} that config.mesh.axes "
                       f"{tuple(mesh.axis_names)} lacks")
    return size % int(np.prod([mesh.shape[a] for a in names])) == 0
  return P(*(axes if axes is None or fits(axes, size) else None
             for axes, size in zip(spec, shape)))


def param_shardings(mesh: Mesh, abstract_params, rules) -> Any:
  """NamedSharding per parameter from the regex rules (abstract or concrete params)."""
  paths = tree_paths(abstract_params)
  return jax.tree.map(
      lambda p, x: NamedSharding(mesh, fit_to_mesh(spec_for(p, np.ndim(x), rules),
                                                   np.shape(x), mesh)),
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


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """`fn` (a jitted function) called with `mesh` set (`jax.set_mesh`), so that the model's
  activation layout hints (`model.constrain`) apply when it is traced. Without them XLA
  may compute the whole batch on every device (see `model.constrain`)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]
