"""The pipeline end to end on the quick variant: outputs, resumption, preemption and NaN stops."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import pipeline as pipeline_config
from llama2_jax import checkpoint_io, hf_io
from llama2_jax.config import get_model_config
from llama2_jax.model import Llama, init_params
from llama2_jax.checkpoint import CheckpointConfig, Checkpointer
from llama2_jax.pipeline import loop
from llama2_jax.pipeline.run import STAGES, run_pipeline
from llama2_jax.pipeline.settings import settings_from_config
from llama2_jax.train_state import TrainState


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One prepared copy of the datasets for every run of this module."""
  return str(tmp_path_factory.mktemp("data"))


def quick_config(data_dir: str) -> ml_collections.ConfigDict:
  config = pipeline_config.get_config("quick")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("run")
  report = run_pipeline(quick_config(data_dir), workdir)
  return workdir, report


def _numbers(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _numbers(value)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_quick_pipeline_writes_every_output(finished_run):
  workdir, report = finished_run
  assert report == workdir / "report" / "report.md"
  assert report.exists()
  assert json.loads((workdir / "config.json").read_text())["model"]["preset"] == "test_gqa"
  for stage in STAGES:
    assert (workdir / "stages" / stage / "done.json").exists(), stage
  for stage in STAGES[:-1]:
    assert (workdir / "stages" / stage / "final" / "params").is_dir(), stage
    assert any((workdir / "stages" / stage / "checkpoints").iterdir()), stage

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {record["stage"] for record in records} == set(STAGES[:-1])
  events = list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  assert len(events) >= len(STAGES) - 1

  report_json = json.loads((workdir / "report" / "report.json").read_text())
  results = report_json["results"]
  assert set(results["policies"]) == {"sft", "rejection_sampling", "ppo"}
  for name, policy in results["policies"].items():
    for key in ("combined_reward", "helpfulness_reward", "safety_reward", "kl_to_reference"):
      assert math.isfinite(policy[key]), (name, key)
    assert policy["samples"], name
    assert policy["refusals"]["safe_prompts"] > 0
    assert len(policy["self_bleu"]) == 2
  # The SFT policy is the reference of the KL column, so its estimate is exactly 0.
  assert results["policies"]["sft"]["kl_to_reference"] == 0.0
  for name in ("helpfulness", "safety"):
    assert sum(results["reward_models"][name]["pairs_by_rating"].values()) > 0
  assert results["best_of_k"]["k"] == [1, 2]
  assert "ppo_vs_sft" in results["win_rates"]
  numbers = list(_numbers(report_json))
  assert numbers and all(math.isfinite(value) for value in numbers)
  for plot in report_json["plots"].values():
    assert (workdir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages(finished_run, data_dir, capsys):
  workdir, _ = finished_run
  before = (workdir / "report" / "report.json").read_bytes()
  run_pipeline(quick_config(data_dir), workdir)
  printed = capsys.readouterr().out
  for stage in STAGES:
    assert f"{stage}: already done, skipped" in printed
  assert (workdir / "report" / "report.json").read_bytes() == before


def test_resuming_with_another_config_is_refused(finished_run, data_dir):
  workdir, _ = finished_run
  config = quick_config(data_dir)
  config.sft.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config .*'sft'"):
    run_pipeline(config, workdir)


def test_sigterm_resume_matches_uninterrupted_run(
    tmp_path, data_dir, monkeypatch, capsys):
  stages = ("pretrain", "sft")
  config = quick_config(data_dir)
  config.log.log_every = 1  # A record at every step, the checkpoint's step included.
  uninterrupted = tmp_path / "uninterrupted"
  run_pipeline(config, uninterrupted, stages)

  interrupted = tmp_path / "interrupted"
  original = loop.check_finite

  def preempt_at_sft_step_3(stage, step, metrics, keys):
    original(stage, step, metrics, keys)
    if stage == "sft" and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop, "check_finite", preempt_at_sft_step_3)
  with pytest.raises(loop.Preempted) as raised:
    run_pipeline(config, interrupted, stages)
  assert raised.value.code == 143
  assert raised.value.step == 3
  checkpoints = interrupted / "stages" / "sft" / "checkpoints"
  with Checkpointer(CheckpointConfig(directory=str(checkpoints))) as checkpointer:
    assert checkpointer.latest_step() == 3
  assert not (interrupted / "stages" / "sft" / "done.json").exists()

  monkeypatch.setattr(loop, "check_finite", original)
  run_pipeline(config, interrupted, stages)
  assert "pretrain: already done, skipped" in capsys.readouterr().out
  _, expected = checkpoint_io.load_orbax(uninterrupted / "stages" / "sft" / "final")
  _, resumed = checkpoint_io.load_orbax(interrupted / "stages" / "sft" / "final")
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)
  # The metrics log has each SFT step once, as in the uninterrupted run.
  def sft_steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if json.loads(line)["stage"] == "sft"]
  assert sft_steps(interrupted) == sft_steps(uninterrupted)


def test_nan_loss_keeps_last_checkpoint(tmp_path):
  settings = loop.LoopSettings(stage="sft", num_steps=10, workdir=str(tmp_path),
                               checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=1,
                               keep_checkpoints=2, log_every=1, loss_keys=("sft/loss",))
  tx = optax.sgd(0.1)

  def create():
    return TrainState.create(params={"w": jnp.ones(2)}, tx=tx, rng=jax.random.key(0),
                             data_state={"index": 0})

  abstract = jax.eval_shape(create)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=sharding), abstract)
  position = {"index": 0}

  def step_fn(state, batch):
    position["index"] += 1
    loss = jnp.nan if int(state.step) == 3 else 1.0
    return state.replace(step=state.step + 1), {"sft/loss": loss}

  def batches():
    while True:
      yield None

  with pytest.raises(loop.NonFiniteLossError, match=r"'sft' stopped at step 4: metric sft/loss"):
    loop.run_loop(settings, create_state=create, abstract_state=abstract, step_fn=step_fn,
                  batches=batches(), get_data_state=lambda: dict(position),
                  set_data_state=position.update)
  with Checkpointer(CheckpointConfig(directory=str(tmp_path / "checkpoints"))) as checkpointer:
    assert checkpointer.latest_step() == 3
    assert checkpointer.read_metadata()["data_state"] == {"index": 3}


@pytest.mark.parametrize("variant", pipeline_config.VARIANTS)
def test_every_variant_builds_and_validates(variant):
  config = pipeline_config.get_config(variant)
  settings = settings_from_config(config, vocab_size=32000)
  assert settings.sft.steps > 0
  assert settings.model.vocab_size == 32000


def test_data_and_optimizer_sections_reach_the_settings():
  config = pipeline_config.get_config("tiny")
  config.data.rl_prompts = "jsonl:/data/mine.jsonl:safety,red_team:/data/red.jsonl.gz"
  config.optim.b2 = 0.99
  settings = settings_from_config(config, vocab_size=4096)
  first, second = settings.data_sources["rl_prompts"]
  assert (first.format, first.path, first.is_safety) == ("jsonl", "/data/mine.jsonl", True)
  assert (second.format, second.path, second.is_safety) == ("red_team", "/data/red.jsonl.gz",
                                                            False)
  assert "sft_dialogues" not in settings.data_sources
  assert settings.optim.b2 == 0.99
  assert settings.optim.weight_decay == 0.1


def test_malformed_data_source_names_the_field():
  config = pipeline_config.get_config("tiny")
  config.data.sft_dialogues = "my_dialogues.jsonl"
  with pytest.raises(ValueError, match=r"config.data.sft_dialogues entry 'my_dialogues.jsonl'"):
    settings_from_config(config, vocab_size=4096)


def test_configs_are_locked_and_name_valid_keys():
  config = pipeline_config.get_config("tiny")
  with pytest.raises(AttributeError, match="learning_rate"):
    config.sft.learning_rat = 1.0
  config = pipeline_config.get_config("tiny")
  config.ppo.kl_estimator = "k2"
  with pytest.raises(ValueError, match=r"config.ppo.kl_estimator is 'k2'"):
    settings_from_config(config, vocab_size=4096)


@pytest.mark.parametrize("override, message", [
    ("--config.sft.learning_rat=1", 'Did you mean "learning_rate" instead of "learning_rat"?'),
    ("--config.ppo.kl_estimator=k2", "config.ppo.kl_estimator is 'k2'"),
])
def test_command_line_errors_are_one_line(tmp_path, override, message):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run_pipeline", override, f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parent.parent,
      timeout=300)
  assert result.returncode == 1
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_init_from_hugging_face_weights_skips_pretraining(tmp_path, data_dir, capsys):
  model_config = get_model_config("test_gqa", vocab_size=4096)  # The shipped tokenizer's size.
  params = init_params(Llama(model_config), jax.random.key(3))
  hf_io.save_hf(jax.device_get(params), model_config, tmp_path / "hf")
  config = quick_config(data_dir)
  config.init_from = str(tmp_path / "hf")

  run_pipeline(config, tmp_path / "run", ("pretrain", "sft"))

  assert f"pretrain: skipped, the base model comes from {tmp_path / 'hf'}" in (
      capsys.readouterr().out)
  assert not (tmp_path / "run" / "stages" / "pretrain").exists()
  # SFT started from the imported weights, so 6 small steps leave the embeddings close to them;
  # a fresh initialisation would be uncorrelated with them.
  _, sft = checkpoint_io.load_orbax(tmp_path / "run" / "stages" / "sft" / "final")
  before = np.asarray(params["params"]["tok_embeddings"])
  after = sft["params"]["tok_embeddings"]
  assert after.shape == before.shape
  assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.9


def test_second_rlhf_round_pools_samples(tmp_path, data_dir):
  config = quick_config(data_dir)
  config.rlhf_rounds = 2
  report = run_pipeline(config, tmp_path)

  stages = tmp_path / "stages"
  for stage in ("rejection_sampling_2", "ppo_2"):
    assert (stages / stage / "done.json").exists(), stage
  first = np.load(stages / "rejection_sampling" / "pool.npz")
  second = np.load(stages / "rejection_sampling_2" / "pool.npz")
  np.testing.assert_array_equal(second["prompts"], first["prompts"])
  # A prompt's pooled sample is replaced only by a better one, and comes from round 1 or 2.
  assert np.all(second["reward"] >= first["reward"])
  assert set(np.unique(second["round"])) <= {1, 2}
  assert json.loads((stages / "ppo_2" / "done.json").read_text())["round"] == 2
  assert "training_ppo_2" in json.loads(report.with_suffix(".json").read_text())["plots"]
