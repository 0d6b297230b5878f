"""The training state: parameters, optimizer state, step count, RNG key and data position.

A `TrainState` holds everything a preempted job needs to continue with the same numbers, so a
checkpoint of it (`llama2_jax.checkpoint`) is enough to resume. Build its shardings without
allocating it:

  abstract = jax.eval_shape(
      lambda: TrainState.create(params=init_params(model, key), tx=tx, rng=key))
  shardings = state_shardings(abstract, param_axes(model), mesh)
  state = sharding.create_sharded(
      lambda: TrainState.create(params=init_params(model, key), tx=tx, rng=key), shardings)
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

from llama2_jax import sharding as sharding_lib

_INT32_MIN, _INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@flax.struct.dataclass
class TrainState:
  """Parameters and everything else that a training step reads and updates.

  Attributes:
    step: number of optimizer updates applied so far, an int32 scalar.
    params: the parameter tree, {"params": {...}}.
    opt_state: the state of `tx`.
    rng: the run's base key, a typed key from `jax.random.key`. It never changes: a step derives
      its own key with `step_rng`, so a resumed run draws the same numbers.
    data_state: position of the data iterator, a dict of int32 scalars (an epoch, a record
      index), set by the training loop with `with_data_state`.
    tx: the optax transformation; static, so it is neither traced nor saved.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  data_state: dict[str, jax.Array]
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
             data_state: Mapping[str, int] | None = None) -> TrainState:
    """Builds the state at step 0 with a fresh optimizer state."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      raise ValueError(
          f"TrainState.rng must be a typed key from jax.random.key, got dtype {rng.dtype}. "
          "Wrap raw uint32 key data with jax.random.wrap_key_data.")
    data_state = {name: jnp.asarray(_check_int32(name, value), jnp.int32)
                  for name, value in (data_state or {}).items()}
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
               data_state=data_state, tx=tx)

  def apply_gradients(self, grads: Any) -> TrainState:
    """Applies one optimizer update and increments `step`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)

  def step_rng(self) -> jax.Array:
    """Returns this step's key, `fold_in(rng, step)`."""
    return jax.random.fold_in(self.rng, self.step)

  def with_data_state(self, data_state: Mapping[str, int]) -> TrainState:
    """Replaces the data position, keeping its names and the placement of its arrays.

    Raises:
      ValueError: if the names differ from the current ones (that would change the tree a jitted
        step was compiled for) or a value does not fit in int32.
    """
    if set(data_state) != set(self.data_state):
      raise ValueError(
          f"TrainState.data_state names {sorted(data_state)} differ from the current names "
          f"{sorted(self.data_state)}; set all names in TrainState.create.")
    new = {}
    for name, value in data_state.items():
      array = np.asarray(_check_int32(name, value), np.int32)
      old = self.data_state[name]
      new[name] = jax.device_put(array, old.sharding) if isinstance(old, jax.Array) else array
    return self.replace(data_state=new)

  def data_state_ints(self) -> dict[str, int]:
    """Returns the data position as Python ints (for JSON and logs)."""
    return {name: int(jax.device_get(value)) for name, value in self.data_state.items()}


def _check_int32(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"TrainState.data_state[{name!r}] must be an int, got {value!r}.")
  if not _INT32_MIN <= value <= _INT32_MAX:
    raise ValueError(
        f"TrainState.data_state[{name!r}] = {value} does not fit in int32; store a smaller "
        "quantity (an index within a shard, say) or split it into two entries.")
  return int(value)


def state_shardings(abstract_state: TrainState, param_logical_specs: Any, mesh: Mesh,
                    rules: sharding_lib.Rules = sharding_lib.LOGICAL_AXIS_RULES) -> TrainState:
  """Computes the sharding of every array of a state from `jax.eval_shape` of it.

  Parameters follow `rules`, optimizer state follows the parameters, and the step, key and data
  position are replicated.

  Args:
    abstract_state: the state's `ShapeDtypeStruct`s, from `jax.eval_shape`.
    param_logical_specs: logical axis names of the parameters, e.g. `model.param_axes(model)`.
    mesh: the target mesh.
    rules: the logical-to-mesh table.

  Returns:
    A `TrainState` whose leaves are `NamedSharding`s, usable as `in_shardings`/`out_shardings`.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  params = sharding_lib.tree_shardings(abstract_state.params, param_logical_specs, mesh, rules)
  opt_state = sharding_lib.optimizer_state_shardings(
      abstract_state.tx, abstract_state.opt_state, abstract_state.params, params, mesh)
  return abstract_state.replace(
      step=replicated, params=params, opt_state=opt_state, rng=replicated,
      data_state={name: replicated for name in abstract_state.data_state})
