"""Device meshes and the placement of parameters, optimizer state and batches on them.

The mesh has three named axes:
  data: data parallelism; parameters are replicated across it.
  fsdp: fully sharded data parallelism; the batch is split across it and so are parameters and
    optimizer state (along their `embed` axis).
  tensor: tensor parallelism over attention heads, the feed-forward width and the vocabulary.

`LOGICAL_AXIS_RULES` is the one table from the model's logical axis names to mesh axes. Every
sharding is computed from it and from shapes given by `jax.eval_shape`, so an array's placement is
known before the array exists, and the same code runs on one CPU device (a 1x1x1 mesh) and on a pod.
A logical name missing from the table raises a `ValueError`.

Indivisible dimensions: a parameter or optimizer-state dimension whose size is not divisible by the
total size of its mesh axes is replicated across those axes instead, with a warning that names the
array. This happens, for example, for the 8 key/value heads of 70B on a tensor axis of 16, or the 2
key/value heads of `test_gqa` on a tensor axis of 4. Batch dimensions are never replicated this
way: an indivisible batch raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import optax

from llama2_jax.model import Llama, init_params, param_axes

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: Rules = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # Parameters, as named in `llama2_jax.model`.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; their product must equal the number of devices.

  Attributes:
    data: size of the `data` axis, or -1 for the devices left over by the other axes.
    fsdp: size of the `fsdp` axis, or -1 for the devices left over.
    tensor: size of the `tensor` axis, or -1 for the devices left over.
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    for name, size in self._sizes().items():
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(
            f"MeshConfig.{name} must be a positive integer or -1 (the remaining devices), "
            f"got {size!r}.")
    if list(self._sizes().values()).count(-1) > 1:
      raise ValueError(f"MeshConfig allows -1 for at most one axis, got {self._describe()}.")

  def _sizes(self) -> dict[str, int]:
    return {name: getattr(self, name) for name in MESH_AXES}

  def _describe(self) -> str:
    return ", ".join(f"{name}={size}" for name, size in self._sizes().items())

  def axis_sizes(self, device_count: int) -> tuple[int, int, int]:
    """Returns the (data, fsdp, tensor) sizes for `device_count` devices, filling in a -1."""
    sizes = self._sizes()
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if -1 not in sizes.values():
      if fixed != device_count:
        raise ValueError(
            f"MeshConfig {self._describe()} needs {fixed} devices, but {device_count} are "
            f"available. Choose sizes whose product is {device_count}, or set one size to -1.")
      return tuple(sizes.values())
    if device_count % fixed:
      raise ValueError(
          f"MeshConfig {self._describe()} cannot use {device_count} devices: {device_count} is "
          f"not divisible by the product of the fixed sizes ({fixed}).")
    return tuple(device_count // fixed if size == -1 else size for size in sizes.values())


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_config.axis_sizes(len(devices))
  # TODO: multi-slice TPU pods need `mesh_utils.create_hybrid_device_mesh` to keep the slower
  # links between slices on the `data` axis; this mesh orders devices within one slice only.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_axes_of(logical_name: str, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
  """Returns the mesh axes that `rules` assigns to a logical axis; () means replicated."""
  table = dict(rules)
  if logical_name not in table:
    raise ValueError(
        f"Logical axis {logical_name!r} has no sharding rule; the rules cover {sorted(table)}. "
        "Add it to the rules table (llama2_jax.sharding.LOGICAL_AXIS_RULES).")
  axes = table[logical_name]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Rules = LOGICAL_AXIS_RULES, *, name: str = "array",
                         replicate_indivisible: bool = True) -> PartitionSpec:
  """Maps the logical axis names of one array to a mesh `PartitionSpec` with one entry per dim.

  Args:
    logical_spec: one logical name (or None) per leading dimension; missing trailing entries are
      replicated.
    shape: the array's shape.
    mesh: the target mesh; every mesh axis in `rules` must be one of its axes.
    rules: the logical-to-mesh table.
    name: the array's name for messages.
    replicate_indivisible: replicate a dimension that its mesh axes do not divide (with a
      warning) instead of raising.

  Returns:
    A `PartitionSpec` of length `len(shape)`.
  """
  if len(logical_spec) > len(shape):
    raise ValueError(
        f"{name} has {len(logical_spec)} logical axes {tuple(logical_spec)} but shape {shape}.")
  entries = []
  padded = tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))
  for dim, (size, logical) in enumerate(zip(shape, padded)):
    axes = () if logical is None else mesh_axes_of(logical, rules)
    unknown = [axis for axis in axes if axis not in mesh.shape]
    if unknown:
      raise ValueError(
          f"The rule for logical axis {logical!r} uses mesh axes {unknown} that the mesh does not "
          f"have; the mesh axes are {tuple(mesh.axis_names)}.")
    shards = math.prod(mesh.shape[axis] for axis in axes)
    if size % shards:
      message = (f"{name}: dimension {dim} ({logical!r}, size {size}) is not divisible by the "
                 f"{shards} shards of mesh axes {axes}")
      if not replicate_indivisible:
        raise ValueError(message + ". Choose a size divisible by that, or a smaller mesh axis.")
      logging.warning("%s; replicating that dimension instead.", message)
      axes = ()
    if not axes:
      entries.append(None)
    elif len(axes) == 1:
      entries.append(axes[0])
    else:
      entries.append(axes)
  return PartitionSpec(*entries)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh,
                   rules: Rules = LOGICAL_AXIS_RULES, *,
                   replicate_indivisible: bool = True) -> Any:
  """Computes a `NamedSharding` for every array of a tree from its logical axis names.

  Args:
    abstract_tree: arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`.
    logical_specs: a tree of the same structure whose leaves are `PartitionSpec`s of logical axis
      names. A leaf may be None only for a scalar.
    mesh: the target mesh.
    rules: the logical-to-mesh table.
    replicate_indivisible: see `logical_to_mesh_spec`.

  Returns:
    A tree of `NamedSharding`s with the structure of `abstract_tree`.
  """
  def leaf_sharding(path, leaf, spec):
    name = _path_name(path)
    if spec is None:
      if jnp.ndim(leaf):
        raise ValueError(f"{name} (shape {leaf.shape}) has no logical axis names.")
      spec = PartitionSpec()
    mesh_spec = logical_to_mesh_spec(spec, leaf.shape, mesh, rules, name=name,
                                     replicate_indivisible=replicate_indivisible)
    return NamedSharding(mesh, mesh_spec)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree, logical_specs)


def abstract_model_params(model: Llama) -> tuple[Any, Any]:
  """Returns the model's parameter shapes (`ShapeDtypeStruct`s) and logical axis names."""
  abstract_params = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
  return abstract_params, param_axes(model)


def model_param_shardings(model: Llama, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """Computes the `NamedSharding` of every parameter of `model`, without initialising it."""
  abstract_params, logical_specs = abstract_model_params(model)
  return tree_shardings(abstract_params, logical_specs, mesh, rules)


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                              abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Computes shardings for an optax state: copies of the parameter tree follow the parameters.

  optax states hold copies of the parameter tree (Adam's moments, for example) beside scalars
  (step counts). `optax.tree_map_params` finds the copies; each leaf in them gets its parameter's
  sharding. Other leaves are replicated, with a warning for any that is not a scalar.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def follow_param(state_leaf, param_leaf, sharding):
    if state_leaf.shape != param_leaf.shape:
      raise ValueError(
          f"An optimizer state leaf of shape {state_leaf.shape} is a copy of a parameter of "
          f"shape {param_leaf.shape}, so it cannot take that parameter's sharding.")
    return sharding

  def replicate(leaf):
    if jnp.ndim(leaf):
      logging.warning("Replicating optimizer state leaf of shape %s: it is not a copy of the "
                      "parameter tree.", leaf.shape)
    return replicated

  return optax.tree_map_params(tx, follow_param, abstract_opt_state, abstract_params,
                               param_shardings, transform_non_params=replicate)


def batch_shardings(abstract_batch: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """Shards the leading (`batch`) dimension of every array of a batch; scalars are replicated.

  Raises:
    ValueError: if a batch size is not divisible by the total size of the `batch` mesh axes.
  """
  def leaf_sharding(path, leaf):
    spec = ("batch",) if jnp.ndim(leaf) else ()
    mesh_spec = logical_to_mesh_spec(spec, leaf.shape, mesh, rules, name=_path_name(path),
                                     replicate_indivisible=False)
    return NamedSharding(mesh, mesh_spec)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_batch)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attaches shardings to a tree of `ShapeDtypeStruct`s (for restoring or `jax.jit` lowering)."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_tree, shardings)


def create_sharded(init_fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
  """Runs `init_fn(*args)` under `jax.jit` so each output array is created already sharded.

  Useful for a model too large for one device: its parameters never exist unsharded.
  """
  return jax.jit(init_fn, out_shardings=shardings)(*args)


def jit_sharded_step(step_fn: Callable[..., tuple[Any, Any]], *, mesh: Mesh, state_shardings: Any,
                     batch_shardings: Any, extra_arg_shardings: Sequence[Any] = (),
                     donate_state: bool = True) -> Callable[..., tuple[Any, Any]]:
  """Jits `step_fn(state, batch, *extra_args) -> (new_state, metrics)` with explicit placements.

  The new state gets `state_shardings`, the same as the input state, so the state's buffers can
  be donated and reused; the metrics are replicated on every device.

  Args:
    step_fn: a pure step function; bind its hyper-parameters with `functools.partial` first.
    mesh: the mesh of all the shardings.
    state_shardings: tree of `NamedSharding`s of the state.
    batch_shardings: tree of `NamedSharding`s of the batch, e.g. from `batch_shardings`.
    extra_arg_shardings: one sharding (or tree of shardings) per further positional argument.
    donate_state: donate the input state's buffers; the caller must not use that state again.
      NOTE: on CPU, JAX silently skips donating a buffer that a numpy view (from
      `jax.device_get` or `np.asarray`) still references, and copies it instead.

  Returns:
    The jitted function.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_shardings, *extra_arg_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,) if donate_state else ())
