"""Tests of meshes, the sharding rules and sharded parity with one device."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec
import optax
import pytest

from llama2_jax import sharding
from llama2_jax.config import get_model_config
from llama2_jax.model import Llama
from llama2_jax.train_state import TrainState, state_shardings
from tests import multidevice


def test_sharded_meshes_match_one_device():
  # Forward pass, one AdamW step and every parameter's sharding on meshes (8, 1, 1), (2, 2, 2) and
  # (1, 2, 4); see the script for the checks.
  output = multidevice.run_script("sharding_parity.py", device_count=8)
  assert output.count("match one device") == 3, output


def test_axis_sizes_fill_remaining_devices():
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).axis_sizes(8) == (2, 2, 2)
  assert sharding.MeshConfig(data=1, fsdp=1, tensor=-1).axis_sizes(4) == (1, 1, 4)
  assert sharding.MeshConfig(data=1, fsdp=2, tensor=4).axis_sizes(8) == (1, 2, 4)


def test_mesh_size_mismatch_names_sizes_and_devices():
  with pytest.raises(ValueError, match=r"data=2, fsdp=2, tensor=2 needs 8 devices, but 1 are"):
    sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), devices=jax.devices()[:1])


def test_fill_axis_needs_divisible_device_count():
  with pytest.raises(ValueError, match=r"8 is not divisible by the product of the fixed sizes \(3\)"):
    sharding.MeshConfig(data=3, fsdp=-1, tensor=1).axis_sizes(8)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1), "at most one axis"),
    (dict(tensor=0), r"MeshConfig.tensor must be a positive integer or -1"),
    (dict(data=2.0), r"MeshConfig.data must be a positive integer or -1 .*, got 2.0"),
])
def test_mesh_config_rejects_invalid_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.MeshConfig(**sizes)


def test_one_device_mesh_places_every_parameter():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  shardings = sharding.model_param_shardings(Llama(get_model_config("test_mha")), mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings)
  assert specs["params"]["layers"]["attention"]["wq"] == PartitionSpec(
      None, "fsdp", "tensor", None)
  assert specs["params"]["tok_embeddings"] == PartitionSpec("tensor", "fsdp")


def test_unknown_logical_axis_raises():
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
  rules_without_mlp = [rule for rule in sharding.LOGICAL_AXIS_RULES if rule[0] != "mlp"]
  with pytest.raises(ValueError, match=r"Logical axis 'mlp' has no sharding rule"):
    sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 192), mesh, rules_without_mlp)


def test_unknown_logical_axis_in_model_tree_raises():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  abstract, specs = sharding.abstract_model_params(Llama(get_model_config("test_gqa")))
  rules_without_vocab = [rule for rule in sharding.LOGICAL_AXIS_RULES if rule[0] != "vocab"]
  with pytest.raises(ValueError, match=r"Logical axis 'vocab' has no sharding rule"):
    sharding.tree_shardings(abstract, specs, mesh, rules_without_vocab)


def test_rule_naming_missing_mesh_axis_raises():
  mesh = AbstractMesh((2, 4), ("data", "tensor"))
  with pytest.raises(ValueError, match=r"mesh axes \['fsdp'\] that the mesh does not have"):
    sharding.logical_to_mesh_spec(("embed",), (64,), mesh)


def test_indivisible_dimension_is_replicated_with_warning(caplog):
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
  with caplog.at_level(logging.WARNING):
    spec = sharding.logical_to_mesh_spec(
        ("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh, name="wk")
  assert spec == PartitionSpec(None, "fsdp", None, None)
  assert "wk: dimension 2 ('kv_heads', size 2) is not divisible" in caplog.text


def test_indivisible_dimension_raises_when_strict():
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"wk: dimension 2 \('kv_heads', size 2\) is not divisible "
                                       r"by the 4 shards of mesh axes \('tensor',\)"):
    sharding.logical_to_mesh_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16),
                                  mesh, name="wk", replicate_indivisible=False)


def test_batch_spans_data_and_fsdp():
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  spec = sharding.logical_to_mesh_spec(("batch", "length"), (8, 16), mesh,
                                       replicate_indivisible=False)
  assert spec == PartitionSpec(("data", "fsdp"), None)


def test_scalar_without_logical_axes_is_replicated():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  shardings = sharding.tree_shardings({"count": jax.ShapeDtypeStruct((), jnp.int32)},
                                      {"count": None}, mesh)
  assert shardings["count"].spec == PartitionSpec()


def test_array_without_logical_axes_raises():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"w \(shape \(4, 4\)\) has no logical axis names"):
    sharding.tree_shardings({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}, {"w": None}, mesh)


def _gradient_step(state, batch):
  grads = {"w": batch["grad_BxE"].sum(axis=0)}
  return state.apply_gradients(grads), {"grad_sum": jnp.sum(batch["grad_BxE"])}


@pytest.mark.parametrize("donate_state", [True, False])
def test_jit_sharded_step_donates_state(donate_state):
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  make_state = lambda: TrainState.create(params={"w": jnp.ones(4)}, tx=optax.adam(0.1),
                                         rng=jax.random.key(0))
  shardings = state_shardings(jax.eval_shape(make_state), {"w": PartitionSpec("embed")}, mesh)
  batch = {"grad_BxE": jnp.ones((2, 4))}
  step = sharding.jit_sharded_step(
      _gradient_step, mesh=mesh, state_shardings=shardings,
      batch_shardings=sharding.batch_shardings(batch, mesh), donate_state=donate_state)
  state = sharding.create_sharded(make_state, shardings)

  new_state, metrics = step(state, batch)

  assert state.params["w"].is_deleted() == donate_state
  assert state.opt_state[0].mu["w"].is_deleted() == donate_state
  assert not batch["grad_BxE"].is_deleted()
  assert int(new_state.step) == 1
  assert float(metrics["grad_sum"]) == 8.0
  assert new_state.params["w"].sharding == shardings.params["w"]
