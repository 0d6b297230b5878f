"""Runs the Llama 2-Chat pipeline, stage by stage, resuming where an earlier run stopped.

Stages, each starting from the previous stage's output in the work directory:

  pretrain             a small base model trained from scratch on the shipped dialogues
                       (skipped when `init_from` names Meta or Hugging Face weights)
  sft                  supervised fine-tuning, loss on answer tokens only
  reward_helpfulness   a reward model on helpfulness pairs, initialised from SFT
  reward_safety        a reward model on safety pairs, initialised from SFT
  rejection_sampling   best of K samples per RL prompt by the combined reward, then fine-tuning
  ppo                  PPO against the frozen rejection-sampling policy with a KL penalty
  eval                 held-out evaluation of the policies and the report

With `rlhf_rounds` N > 1, rejection sampling and PPO repeat as rounds 2..N, named
`rejection_sampling_2`, `ppo_2`, and so on; each round starts from the previous round's PPO
policy, and the evaluation compares SFT with the last round.

A finished stage has `stages/<stage>/done.json` and is skipped on a rerun; an unfinished stage
resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Sequence

import jax
import tensorflow_datasets as tfds

from llama2_jax import checkpoint_io, distributed
from llama2_jax.pipeline import evaluate, ppo_stage, train_stages
from llama2_jax.pipeline.context import RunContext, place_params, write_json_atomically
from llama2_jax.pipeline.policy import load_scorer
from llama2_jax.pipeline.settings import PipelineSettings, settings_from_config
from llama2_jax.sharding import MeshConfig, make_mesh
from llama2_jax.tokenizer import Tokenizer

STAGES = ("pretrain", "sft", "reward_helpfulness", "reward_safety", "rejection_sampling", "ppo",
          "eval")
REWARD_STAGES = ("reward_helpfulness", "reward_safety")
CONFIG_FILENAME = "config.json"
# Fields that may change between a run and its resumption: they do not change any result.
RESUMABLE_FIELDS = ("log",)


def round_stage(kind: str, round_index: int) -> str:
  """Names the stage of `kind` ("rejection_sampling" or "ppo") in an RLHF round, from 1."""
  return kind if round_index == 1 else f"{kind}_{round_index}"


def stage_names(rlhf_rounds: int) -> tuple[str, ...]:
  """Lists the stages in order: `STAGES` with one rejection-sampling and PPO pair per round."""
  rounds = tuple(round_stage(kind, index) for index in range(1, rlhf_rounds + 1)
                 for kind in ("rejection_sampling", "ppo"))
  return ("pretrain", "sft") + REWARD_STAGES + rounds + ("eval",)


def _kind_and_round(stage: str) -> tuple[str, int]:
  kind, _, suffix = stage.rpartition("_")
  if suffix.isdigit() and kind in ("rejection_sampling", "ppo"):
    return kind, int(suffix)
  return stage, 1


def _print(message: str) -> None:
  if distributed.is_main_process():
    print(message, flush=True)


def _check_same_config(path: pathlib.Path, resolved: dict[str, Any]) -> None:
  """Refuses to resume a work directory that was started with a different config."""
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  changed = sorted(key for key in set(saved) | set(resolved)
                   if key not in RESUMABLE_FIELDS and saved.get(key) != resolved.get(key))
  if changed:
    raise ValueError(
        f"The work directory {path.parent} was started with a different config (sections "
        f"{changed} differ from {path}). Resume with the same config, or use a new --workdir.")


def _initial_model(config, settings: PipelineSettings,
                   tokenizer: Tokenizer) -> tuple[PipelineSettings, Any]:
  """Loads `init_from` weights; the model's architecture then comes from the checkpoint."""
  if not settings.init_from:
    return settings, None
  model_config, params = checkpoint_io.load_checkpoint(
      settings.init_from, settings.init_format or None, settings.model.param_dtype)
  if model_config.vocab_size != tokenizer.vocab_size:
    raise ValueError(
        f"The checkpoint {settings.init_from} has a vocabulary of {model_config.vocab_size} "
        f"tokens, but the tokenizer {tokenizer.path} has {tokenizer.vocab_size}. Set "
        "--config.data.tokenizer to the checkpoint's tokenizer.model.")
  model_section = config.model
  model_config = model_config.replace(
      dtype=model_section.dtype, param_dtype=model_section.param_dtype,
      remat=model_section.remat, max_seq_len=model_section.max_seq_len)
  return dataclasses.replace(settings, model=model_config), params


def run_pipeline(config, workdir: str | pathlib.Path,
                 stages: Sequence[str] | None = None) -> pathlib.Path | None:
  """Runs the pipeline (or the given `stages`) of an experiment config in `workdir`.

  Args:
    config: the ConfigDict of `experiments/configs/pipeline.py`.
    workdir: where every output goes; rerunning with the same directory resumes.
    stages: names of stages to run (see `stage_names`); None runs all. "rejection_sampling" and
      "ppo" also select those stages of later rounds. A stage needs the earlier ones done.

  Returns:
    The path of report.md when the eval stage ran or had run, else None.
  """
  distributed.initialize(distributed.DistributedConfig(
      enabled=config.distributed.enabled,
      coordinator_address=config.distributed.coordinator_address or None,
      num_processes=config.distributed.num_processes or None,
      process_id=None if config.distributed.process_id < 0 else config.distributed.process_id))
  tfds.disable_progress_bar()  # The stages show their own progress.
  tokenizer = Tokenizer(config.data.tokenizer or None)
  settings = settings_from_config(config, tokenizer.vocab_size)
  settings, imported_params = _initial_model(config, settings, tokenizer)
  mesh = make_mesh(MeshConfig(**settings.mesh))
  all_stages = stage_names(settings.rlhf_rounds)
  requested = set(stages or all_stages)
  unknown = sorted(requested - set(all_stages))
  if unknown:
    raise ValueError(f"Unknown stages {unknown}; expected names from {all_stages}.")

  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = json.loads(config.to_json_best_effort())
  _check_same_config(workdir / CONFIG_FILENAME, resolved)
  if distributed.is_main_process():
    write_json_atomically(workdir / CONFIG_FILENAME, resolved)
  ctx = RunContext(settings=settings, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                   resolved_config=resolved)
  model = settings.model
  _print(f"llama2_jax pipeline in {workdir}: model {model.dim}d x {model.n_layers} layers "
         f"({model.num_params() / 1e6:.1f}M parameters), vocabulary {model.vocab_size}, mesh "
         f"{dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices.")

  scorer = None
  for stage in all_stages:
    kind, round_index = _kind_and_round(stage)
    if stage not in requested and kind not in requested:
      continue
    if stage == "pretrain" and settings.init_from:
      _print("pretrain: skipped, the base model comes from " + settings.init_from)
      continue
    if ctx.is_done(stage):
      _print(f"{stage}: already done, skipped")
      continue
    _require_done(ctx, stage, settings.rlhf_rounds)
    started = time.monotonic()
    if stage == "pretrain":
      summary = train_stages.run_pretrain(ctx)
    elif stage == "sft":
      initial = (place_params(imported_params, ctx.policy_model, mesh) if settings.init_from
                 else ctx.final_params("pretrain", ctx.policy_model))
      summary = train_stages.run_sft(ctx, initial)
    elif stage.startswith("reward_"):
      summary = train_stages.run_reward_model(ctx, stage,
                                              ctx.final_params("sft", ctx.policy_model))
    else:
      scorer = scorer or load_scorer(ctx)
      if kind == "rejection_sampling":
        policy_stage = "sft" if round_index == 1 else round_stage("ppo", round_index - 1)
        summary = train_stages.run_rejection_sampling(
            ctx, scorer, stage=stage, round_index=round_index,
            policy_params=ctx.final_params(policy_stage, ctx.policy_model),
            previous_stage=(None if round_index == 1
                            else round_stage("rejection_sampling", round_index - 1)))
      elif kind == "ppo":
        summary = ppo_stage.run_ppo(
            ctx, scorer, stage=stage, round_index=round_index,
            policy_stage=round_stage("rejection_sampling", round_index))
      else:
        last = settings.rlhf_rounds
        summary, _ = evaluate.run_evaluation(ctx, scorer, {
            "sft": "sft", "rejection_sampling": round_stage("rejection_sampling", last),
            "ppo": round_stage("ppo", last)})
    _print(f"{summary} [{time.monotonic() - started:.0f} s]")

  report = workdir / "report" / "report.md"
  if ctx.is_done("eval"):
    _print(f"Report: {report}\nMetrics: {workdir / 'metrics.jsonl'} (TensorBoard: "
           f"{workdir / 'tensorboard'})\nCheckpoints: {workdir / 'stages'}")
    return report
  return None


def _require_done(ctx: RunContext, stage: str, rlhf_rounds: int) -> None:
  """Raises if a stage that `stage` reads from has not finished."""
  kind, index = _kind_and_round(stage)
  if kind == "pretrain":
    needs = ()
  elif kind == "sft":
    needs = () if ctx.settings.init_from else ("pretrain",)
  elif kind in REWARD_STAGES:
    needs = ("sft",)
  elif kind == "rejection_sampling":
    needs = ("sft",) + REWARD_STAGES
    if index > 1:
      needs += (round_stage("rejection_sampling", index - 1), round_stage("ppo", index - 1))
  elif kind == "ppo":
    needs = (stage.replace("ppo", "rejection_sampling", 1),) + REWARD_STAGES
  else:
    needs = ("sft",) + REWARD_STAGES + (round_stage("rejection_sampling", rlhf_rounds),
                                        round_stage("ppo", rlhf_rounds))
  missing = [name for name in needs if not ctx.is_done(name)]
  if missing:
    raise RuntimeError(f"Stage {stage!r} needs the finished stages {missing}; run them first "
                       "(or run the whole pipeline) with the same --workdir.")
