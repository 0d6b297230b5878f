"""Tests of training-state checkpoints: resharding, retention, atomic writes, exact resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama2_jax import sharding as sharding_lib
from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.train_state import TrainState, state_shardings
from tests import multidevice

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def test_saved_on_8_devices_restores_on_4_and_1(tmp_path):
  multidevice.run_script("checkpoint_reshard.py", f"save:{tmp_path}:2,2,2", device_count=8)
  on_4 = multidevice.ScriptRun("checkpoint_reshard.py", f"restore:{tmp_path}:1,2,2",
                               device_count=4)
  multidevice.run_script("checkpoint_reshard.py", f"restore:{tmp_path}:1,1,1", device_count=1)
  on_4.finish()


def test_saved_on_1_device_restores_on_8(tmp_path):
  multidevice.run_script("checkpoint_reshard.py", f"save:{tmp_path}:1,1,1", device_count=1)
  multidevice.run_script("checkpoint_reshard.py", f"restore:{tmp_path}:1,2,4", device_count=8)


def test_resume_after_step_2_matches_uninterrupted_adam(tmp_path):
  # Adam (lr 0.1, b1 0.9, b2 0.999, eps 1e-8) on f(w) = w^2 from w = 1, in float64:
  # step 1: m = 0.2, v = 0.004, bias-corrected m / sqrt(v) = 2 / 2 = 1, so w = 1 - 0.1 = 0.9.
  # Steps 2 and 3 follow the same update; the values below come from the float64 recurrence.
  first = json.loads(multidevice.run_script(
      "adam_resume.py", "first", tmp_path, device_count=1, enable_x64=True))
  assert [round(w, 9) for w in first["w"]] == [0.900000000, 0.800412229]

  resumed = json.loads(multidevice.run_script(
      "adam_resume.py", "resume", tmp_path, device_count=1, enable_x64=True))
  assert round(resumed["w"], 9) == 0.701586273
  assert resumed["step"] == 3
  assert resumed["data_state"] == {"batches_read": 2}
  # What the check guards against: losing the moments, or only the bias-correction count.
  assert round(resumed["fresh_optimizer"], 9) == 0.700412229
  assert round(resumed["reset_count"], 9) == 0.645709893


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
  directory = tmp_path / "checkpoints"
  result = subprocess.run(
      multidevice.script_command("kill_during_save.py", directory),
      env=multidevice.script_env(device_count=1), capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-5000:]
  entries_at_kill = json.loads(result.stdout.strip().splitlines()[-1])
  assert "1" in entries_at_kill
  assert "2" not in entries_at_kill
  assert any(entry.startswith("2" + TMP_SUFFIX) for entry in entries_at_kill), entries_at_kill

  config = CheckpointConfig(str(directory), save_interval_steps=1, async_save=False)
  abstract = jax.eval_shape(lambda: _big_state(0))
  with Checkpointer(config) as checkpointer:
    assert checkpointer.all_steps() == [1]
    restored = checkpointer.restore(_with_one_device_shardings(abstract))
    np.testing.assert_array_equal(restored.params["w"], np.ones((2048, 2048), np.float32))

    assert checkpointer.save(_big_state(2))
    assert checkpointer.all_steps() == [1, 2]
    # The unfinished directory is deleted in the background, at the latest by the first save.
    assert not any(TMP_SUFFIX in entry for entry in os.listdir(directory))


def _big_state(step: int) -> TrainState:
  # The state that kill_during_save.py writes.
  params = {"w": jnp.full((2048, 2048), float(step), jnp.float32)}
  state = TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
  return state.replace(step=jnp.array(step, jnp.int32))


def _small_state(step: int, size: int = 4) -> TrainState:
  params = {"w": jnp.arange(size, dtype=jnp.float32) * step}
  state = TrainState.create(params=params, tx=optax.adam(1e-3), rng=jax.random.key(step),
                            data_state={"record": 10 * step})
  return state.replace(step=jnp.array(step, jnp.int32))


def _with_one_device_shardings(abstract: TrainState) -> TrainState:
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(), devices=jax.devices()[:1])
  specs = jax.tree.map(lambda leaf: jax.sharding.PartitionSpec(*([None] * leaf.ndim)),
                       abstract.params)
  return sharding_lib.with_shardings(abstract, state_shardings(abstract, specs, mesh))


def _save_steps(config: CheckpointConfig, losses: dict[int, float]) -> tuple[list[int], int]:
  with Checkpointer(config) as checkpointer:
    for step, loss in losses.items():
      assert checkpointer.save(_small_state(step), metrics={"eval/loss": loss})
    checkpointer.wait_until_finished()
    return checkpointer.all_steps(), checkpointer.best_step()


@pytest.mark.parametrize("mode, expected_steps, expected_best", [
    ("min", [2, 6], 2),
    ("max", [5, 6], 5),
])
def test_keeps_newest_and_best(tmp_path, mode, expected_steps, expected_best):
  config = CheckpointConfig(str(tmp_path), keep_last=1, best_metric="eval/loss", best_mode=mode,
                            keep_best=1, save_interval_steps=1, async_save=False)
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 2.0}
  steps, best = _save_steps(config, losses)
  assert steps == expected_steps
  assert best == expected_best


def test_keeps_newest_without_metric(tmp_path):
  config = CheckpointConfig(str(tmp_path), keep_last=2, save_interval_steps=1)
  with Checkpointer(config) as checkpointer:
    for step in range(1, 5):
      checkpointer.save(_small_state(step))
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [3, 4]


def test_save_interval_skips_unless_forced(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=2, async_save=False)
  with Checkpointer(config) as checkpointer:
    assert checkpointer.save(_small_state(1)), "The first save in an empty directory is written."
    assert not checkpointer.save(_small_state(3))
    assert checkpointer.save(_small_state(4))
    assert checkpointer.save(_small_state(5), force=True)
    assert checkpointer.all_steps() == [1, 4, 5]


def test_restore_round_trips_state_and_metadata(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=1, async_save=False)
  state = _small_state(3)
  with Checkpointer(config) as checkpointer:
    checkpointer.save(state, metadata={"model": {"dim": 64}})
    target = _with_one_device_shardings(jax.eval_shape(lambda: _small_state(3)))
    restored = checkpointer.restore(target)
    metadata = checkpointer.read_metadata(3)
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
  for restored_leaf, leaf in zip(jax.tree.leaves(restored.opt_state),
                                 jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(restored_leaf, leaf)
  assert int(restored.step) == 3
  assert restored.data_state_ints() == {"record": 30}
  assert metadata == {"step": 3, "data_state": {"record": 30}, "extra": {"model": {"dim": 64}}}


def test_restore_rejects_other_shape(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=1, async_save=False)
  with Checkpointer(config) as checkpointer:
    checkpointer.save(_small_state(1, size=4))
    target = _with_one_device_shardings(jax.eval_shape(lambda: _small_state(1, size=5)))
    with pytest.raises(ValueError, match=r"params/w has shape \(5,\), but the checkpoint of step "
                                         r"1 holds shape \(4,\)"):
      checkpointer.restore(target)


def test_restore_requires_shardings(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=1, async_save=False)
  with Checkpointer(config) as checkpointer:
    checkpointer.save(_small_state(1))
    with pytest.raises(ValueError, match=r"Restore target step has no sharding"):
      checkpointer.restore(jax.eval_shape(lambda: _small_state(1)))


def test_restore_missing_step_raises(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=1, async_save=False)
  with Checkpointer(config) as checkpointer:
    with pytest.raises(FileNotFoundError, match=r"No checkpoint found"):
      checkpointer.read_metadata()
    checkpointer.save(_small_state(1))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 7 .* saved steps: \[1\]"):
      checkpointer.read_metadata(7)


def test_save_rejects_metrics_without_best_metric(tmp_path):
  config = CheckpointConfig(str(tmp_path), best_metric="eval/loss", save_interval_steps=1)
  with Checkpointer(config) as checkpointer:
    with pytest.raises(ValueError, match=r"lack the best_metric 'eval/loss'"):
      checkpointer.save(_small_state(1), metrics={"train/loss": 1.0})


def test_save_rejects_metadata_not_json(tmp_path):
  config = CheckpointConfig(str(tmp_path), save_interval_steps=1)
  with Checkpointer(config) as checkpointer:
    with pytest.raises(ValueError, match=r"must be JSON-serialisable"):
      checkpointer.save(_small_state(1), metadata={"mesh": object()})


@pytest.mark.parametrize("field, value, message", [
    ("keep_last", 0, r"CheckpointConfig.keep_last must be a positive integer, got 0"),
    ("best_mode", "lowest", r"CheckpointConfig.best_mode is 'lowest'; expected one of"),
    ("directory", "", r"CheckpointConfig.directory must be a non-empty path"),
])
def test_checkpoint_config_rejects_invalid_field(tmp_path, field, value, message):
  fields = {"directory": str(tmp_path), field: value}
  with pytest.raises(ValueError, match=message):
    CheckpointConfig(**fields)
