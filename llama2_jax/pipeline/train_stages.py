"""The supervised stages: pretraining, SFT, the two reward models and rejection sampling.

Each stage function reads the previous stages' outputs from the work directory, trains with
`loop.run_loop` (so it resumes from its own checkpoint), and ends with
`RunContext.finish_stage`. It returns a one-line summary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from llama2_jax import distributed, sharding
from llama2_jax.data import RewardBatcher, SftBatcher
from llama2_jax.data.batchers import PromptBatcher
from llama2_jax.data.iterators import BatchIterator
from llama2_jax.data.sft import sft_batch, sft_example_from_ids
from llama2_jax.evaluation_reward import reward_model_accuracy
from llama2_jax.losses.rejection_sampling import (
    SamplePool, reward_by_num_samples, update_pool)
from llama2_jax.losses.reward import RewardStatistics
from llama2_jax.model import Llama, init_params
from llama2_jax.optim import OptimizerConfig, make_optimizer
from llama2_jax.pipeline.context import (
    DeviceBatches, RunContext, make_train_state, save_arrays_atomically)
from llama2_jax.pipeline.loop import run_loop
from llama2_jax.pipeline.policy import PolicyScorer, sample_responses, score_sequences
from llama2_jax.pipeline.settings import OptimizerSettings, TrainSettings
from llama2_jax.steps.reward import reward_step
from llama2_jax.steps.sft import sft_step

SFT_KEYS = ("tokens", "targets", "loss_mask", "attention_mask", "segment_ids")
REWARD_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask", "margin",
               "rating")
REWARD_STAGES = {"reward_helpfulness": "helpfulness_pairs", "reward_safety": "safety_pairs"}


def cosine_optimizer(train: TrainSettings, optim: OptimizerSettings):
  """AdamW with a linear warm-up and a cosine decay over the stage's steps."""
  return make_optimizer(OptimizerConfig(
      learning_rate=train.learning_rate, schedule="cosine", total_steps=train.steps,
      warmup_steps=train.warmup_steps, num_microbatches=train.num_microbatches,
      **dataclasses.asdict(optim)))


def language_model_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Puts the loss on every next-token prediction inside a document (pretraining).

  The logits at t predict `targets[t]`, which is defined where t and t + 1 are real tokens of
  the same packed segment.
  """
  mask = batch["attention_mask"].astype(bool)
  loss_mask = np.zeros_like(batch["loss_mask"])
  loss_mask[:, :-1] = (mask[:, :-1] & mask[:, 1:]
                       & (batch["segment_ids"][:, :-1] == batch["segment_ids"][:, 1:]))
  return {**{key: batch[key] for key in SFT_KEYS}, "loss_mask": loss_mask}


def _select(keys: Sequence[str]) -> Callable[[dict], dict]:
  return lambda batch: {key: batch[key] for key in keys}


def train_stage(ctx: RunContext, stage: str, train: TrainSettings, *, model: Llama, params: Any,
                batches: DeviceBatches, step_fn, loss_keys: tuple[str, ...]) -> tuple[Any, dict]:
  """Trains `model` with `step_fn` (`sft_step` or `reward_step`) for `train.steps` steps.

  Returns:
    (final parameters, metrics of the last logged step).
  """
  create, abstract_state, state_shardings = make_train_state(
      ctx, model, params, cosine_optimizer(train, ctx.settings.optim), batches.get_state())

  def step(state, batch):
    return step_fn(state, batch, state.step_rng(), model=model,
                   num_microbatches=train.num_microbatches)

  jitted = sharding.jit_sharded_step(step, mesh=ctx.mesh, state_shardings=state_shardings,
                                     batch_shardings=batches.peek_shardings())
  state, metrics = run_loop(
      ctx.loop_settings(stage, train.steps, loss_keys), create_state=create,
      abstract_state=abstract_state, step_fn=jitted, batches=batches,
      get_data_state=batches.get_state, set_data_state=batches.set_state,
      metadata={"config": ctx.resolved_config})
  return state.params, metrics


def train_language_model(ctx: RunContext, stage: str, train: TrainSettings, *, params: Any,
                         batches: DeviceBatches) -> tuple[Any, dict]:
  """Trains the policy with `sft_step`; returns (params, last metrics)."""
  return train_stage(ctx, stage, train, model=ctx.policy_model, params=params, batches=batches,
                     step_fn=sft_step, loss_keys=("sft/loss",))


def dialogue_batches(ctx: RunContext, train: TrainSettings, *, seed_offset: int,
                     transform: Callable[[dict], dict]) -> DeviceBatches:
  config = ctx.batch_config(train.batch_size, train.max_length, seed_offset=seed_offset,
                            packing=train.packing)
  iterator = BatchIterator(ctx.records("sft_dialogues", "train"),
                           SftBatcher(ctx.tokenizer, config), config)
  return DeviceBatches(iterator, ctx.mesh, train.batch_size, transform)


def run_pretrain(ctx: RunContext) -> str:
  """Stage 1: trains a small base model from scratch on every token of the shipped dialogues."""
  train = ctx.settings.pretrain
  params = init_params(ctx.policy_model, jax.random.key(ctx.settings.seed))
  batches = dialogue_batches(ctx, train, seed_offset=1, transform=language_model_batch)
  params, metrics = train_language_model(ctx, "pretrain", train, params=params, batches=batches)
  ctx.finish_stage("pretrain", params, {"metrics": metrics})
  return _summary("pretrain", metrics, ("sft/loss", "sft/accuracy"))


def run_sft(ctx: RunContext, initial_params: Any) -> str:
  """Stage 2: supervised fine-tuning on the dialogues, with the loss on answer tokens only."""
  train = ctx.settings.sft
  batches = dialogue_batches(ctx, train, seed_offset=2, transform=_select(SFT_KEYS))
  params, metrics = train_language_model(ctx, "sft", train, params=initial_params,
                                         batches=batches)
  ctx.finish_stage("sft", params, {"metrics": metrics})
  return _summary("sft", metrics, ("sft/loss", "sft/accuracy"))


def reward_model_from_policy(ctx: RunContext, policy_params: Any) -> Any:
  """Initialises a reward model from a policy: the same backbone and a new score head.

  The language-model output projection is dropped; parameters the policy lacks (the score head
  and its bias) come from a fresh initialisation.
  """
  fresh = init_params(ctx.reward_model, jax.random.key(ctx.settings.seed + 7))["params"]
  policy = jax.device_get(policy_params)["params"]
  return {"params": {name: policy.get(name, value) for name, value in fresh.items()}}


def run_reward_model(ctx: RunContext, stage: str, sft_params: Any) -> str:
  """Stage 3: trains one reward model on its preference pairs with the rating margin.

  Afterwards it measures the model's score statistics on its training pairs (for whitening at
  PPO time) and its accuracy per rating class on held-out test pairs.
  """
  settings = ctx.settings.reward
  train = settings.train
  dataset = REWARD_STAGES[stage]
  model = ctx.reward_model
  seed_offset = 3 if stage == "reward_helpfulness" else 4
  config = ctx.batch_config(train.batch_size, train.max_length, seed_offset=seed_offset)
  iterator = BatchIterator(ctx.records(dataset, "train"),
                           RewardBatcher(ctx.tokenizer, config, settings.margin), config)
  batches = DeviceBatches(iterator, ctx.mesh, train.batch_size, _select(REWARD_KEYS))
  params, metrics = train_stage(
      ctx, stage, train, model=model, params=reward_model_from_policy(ctx, sft_params),
      batches=batches, step_fn=reward_step, loss_keys=("reward/loss",))

  train_scores = _score_pairs(ctx, params, dataset, "train", settings.eval_pairs, train)
  statistics = RewardStatistics.measure(
      np.concatenate([train_scores["chosen"], train_scores["rejected"]]))
  test_scores = _score_pairs(ctx, params, dataset, "test", settings.eval_pairs, train)
  accuracy = reward_model_accuracy(chosen_scores_B=test_scores["chosen"],
                                   rejected_scores_B=test_scores["rejected"],
                                   ratings_B=test_scores["rating"])
  ctx.finish_stage(stage, params, {
      "metrics": metrics,
      "statistics": {"mean": statistics.mean, "std": statistics.std},
      "accuracy": {"correct_by_rating": dict(accuracy.correct_by_rating),
                   "pairs_by_rating": dict(accuracy.pairs_by_rating)}})
  return (f"{_summary(stage, metrics, ('reward/loss', 'reward/accuracy'))}, held-out accuracy "
          f"{accuracy.accuracy:.3f} on {accuracy.pairs} pairs")


def _score_pairs(ctx: RunContext, params, dataset: str, split: str, max_pairs: int,
                 train: TrainSettings) -> dict[str, np.ndarray]:
  """Scores up to `max_pairs` pairs of a split in stored order; returns numpy arrays."""
  config = ctx.batch_config(train.batch_size, train.max_length, seed_offset=0, shuffle=False,
                            num_epochs=1, per_host=False)
  iterator = BatchIterator(ctx.records(dataset, split),
                           RewardBatcher(ctx.tokenizer, config, ctx.settings.reward.margin),
                           config)
  chosen, rejected, rating = [], [], []
  count = 0
  for batch in iterator:
    keep = batch["example_mask"] != 0
    for side, scores in (("chosen", chosen), ("rejected", rejected)):
      scores.append(np.asarray(score_sequences(
          ctx.reward_model, params, batch[f"{side}_tokens"], batch[f"{side}_mask"]))[keep])
    rating.append(batch["rating"][keep])
    count += int(keep.sum())
    if count >= max_pairs:
      break
  if not count:
    raise ValueError(f"No {split} pairs of {dataset!r} fit in max_length={train.max_length}.")
  return {"chosen": np.concatenate(chosen)[:max_pairs],
          "rejected": np.concatenate(rejected)[:max_pairs],
          "rating": np.concatenate(rating)[:max_pairs]}


class _ExampleBatcher:
  """Batches prebuilt `SftExample`s (the rejection-sampling winners) for `BatchIterator`."""

  packing = False

  def __init__(self, config, pad_id: int):
    self.config, self.pad_id = config, pad_id

  def encode(self, example):
    return example

  def build(self, rows):
    return sft_batch(rows, batch_size=self.config.batch_size, max_length=self.config.max_length,
                     pad_id=self.pad_id)


def run_rejection_sampling(ctx: RunContext, scorer: PolicyScorer, *, stage: str,
                           round_index: int, policy_params: Any,
                           previous_stage: str | None) -> str:
  """Stage 4: K samples per RL prompt, scored with the combined reward; fine-tunes on the best.

  Each round samples from the latest policy on the same prompts: SFT in round 1, the previous
  round's PPO policy after that. For each prompt it keeps the best sample of this and every
  earlier round, as Llama 2 did (Touvron et al., 2023). The reward models do not change between
  rounds, so earlier rewards stay comparable. The policy is then fine-tuned on
  those samples, starting from the policy that drew them.

  The samples are saved to `samples.npz`, and the pool of best samples to `pool.npz`, before
  fine-tuning, so a rerun after a kill does not sample again.

  Args:
    ctx: the run.
    scorer: both reward models.
    stage: this stage's name, e.g. "rejection_sampling" or "rejection_sampling_2".
    round_index: the RLHF round, from 1.
    policy_params: the policy that samples and is fine-tuned.
    previous_stage: the rejection-sampling stage of the previous round, whose pool is merged.
  """
  settings = ctx.settings.rejection_sampling
  stage_dir = ctx.stage_dir(stage)
  samples_path = stage_dir / "samples.npz"
  if not samples_path.exists():
    arrays = _draw_best_of_k(ctx, policy_params, scorer, round_index)
    save_arrays_atomically(samples_path, arrays)
  arrays = dict(np.load(samples_path))
  rewards_PxK = arrays["rewards"]
  previous_pool = None
  if previous_stage is not None:
    previous = dict(np.load(ctx.stage_dir(previous_stage) / "pool.npz"))
    if not np.array_equal(previous["prompts"], arrays["prompts"]):
      raise ValueError(f"The prompts of {stage} differ from those of {previous_stage}, so their "
                       "samples cannot be pooled; keep the rejection_sampling settings fixed.")
    previous_pool = SamplePool(
        reward_P=previous["reward"], round_P=previous["round"],
        samples_P={"tokens": previous["tokens"], "mask": previous["mask"]})
  pool, pool_metrics = update_pool(
      previous_pool, rewards_PxK=rewards_PxK, sample_mask_PxK=arrays["valid"],
      round_index=round_index,
      samples_PxK={"tokens": arrays["responses"], "mask": arrays["response_masks"]})
  save_arrays_atomically(stage_dir / "pool.npz", {
      "prompts": arrays["prompts"], "reward": np.asarray(pool.reward_P),
      "round": np.asarray(pool.round_P), "tokens": np.asarray(pool.samples_P["tokens"]),
      "mask": np.asarray(pool.samples_P["mask"])})
  curve = reward_by_num_samples(rewards_PxK=rewards_PxK)
  examples = []
  for row in np.flatnonzero(np.asarray(pool.round_P) >= 0):
    prompt = arrays["prompts"][row][arrays["prompt_masks"][row] != 0]
    response = np.asarray(pool.samples_P["tokens"][row])[
        np.asarray(pool.samples_P["mask"][row]) != 0]
    examples.append(sft_example_from_ids(prompt.tolist(), response.tolist(),
                                         eos_id=ctx.tokenizer.eos_id, origin=f"prompt {row}"))
  if not examples:
    raise ValueError("Rejection sampling produced no valid sample to fine-tune on.")

  train = settings.finetune
  config = ctx.batch_config(train.batch_size, train.max_length, seed_offset=5)
  iterator = BatchIterator(examples, _ExampleBatcher(config, ctx.tokenizer.pad_id), config)
  batches = DeviceBatches(iterator, ctx.mesh, train.batch_size, _select(SFT_KEYS))
  params, metrics = train_language_model(ctx, stage, train, params=policy_params,
                                         batches=batches)
  best_of_k = {"k": curve.k.tolist(), "max_reward": np.asarray(curve.max_reward).tolist(),
               "median_reward": np.asarray(curve.median_reward).tolist(),
               "prompts": int(rewards_PxK.shape[0])}
  from_this_round = int(np.sum(np.asarray(pool.round_P) == round_index))
  ctx.finish_stage(stage, params, {
      "metrics": metrics, "best_of_k": best_of_k, "round": round_index,
      "pool_reward": float(pool_metrics["rs/pool_reward"]), "examples": len(examples),
      "pool_from_this_round": from_this_round})
  return (f"{stage}: best of {rewards_PxK.shape[1]} on {rewards_PxK.shape[0]} prompts, pool "
          f"reward {float(pool_metrics['rs/pool_reward']):.3f} ({from_this_round} samples from "
          f"round {round_index}; single sample {best_of_k['max_reward'][0]:.3f}); "
          f"{_summary('fine-tune', metrics, ('sft/loss',))}")


def _draw_best_of_k(ctx: RunContext, params: Any, scorer: PolicyScorer,
                    round_index: int) -> dict[str, np.ndarray]:
  """Samples K responses for each of `num_prompts` RL prompts and scores them."""
  settings = ctx.settings.rejection_sampling
  sampling = settings.sampling
  # Every host samples the same global prompt batch (replicated inputs).
  config = ctx.batch_config(settings.prompt_batch_size, sampling.max_prompt_length,
                            seed_offset=6, per_host=False)
  iterator = BatchIterator(ctx.records("rl_prompts", "train"),
                           PromptBatcher(ctx.tokenizer, config), config)
  num_batches = math.ceil(settings.num_prompts / settings.prompt_batch_size)
  rng = jax.random.fold_in(jax.random.key(ctx.settings.seed + 11), round_index)
  collected: dict[str, list[np.ndarray]] = {key: [] for key in (
      "prompts", "prompt_masks", "responses", "response_masks", "rewards", "valid")}
  progress = tqdm.trange(num_batches, desc=f"rejection sampling, round {round_index}",
                         disable=not distributed.is_main_process(), dynamic_ncols=True)
  for batch_index in progress:
    batch = next(iterator)
    responses, masks, rewards = [], [], []
    for k in range(settings.num_samples):
      key = jax.random.fold_in(rng, batch_index * settings.num_samples + k)
      output = sample_responses(ctx, params, batch["prompt_tokens"], batch["prompt_mask"], key,
                                sampling)
      scores = scorer.score(batch["prompt_tokens"], batch["prompt_mask"], output,
                            batch["is_safety"])
      responses.append(np.asarray(output.tokens_BxT))
      masks.append(np.asarray(output.mask_BxT))
      rewards.append(scores["combined"])
    collected["prompts"].append(batch["prompt_tokens"])
    collected["prompt_masks"].append(batch["prompt_mask"])
    collected["responses"].append(np.stack(responses, axis=1))
    collected["response_masks"].append(np.stack(masks, axis=1))
    collected["rewards"].append(np.stack(rewards, axis=1))
    # A sample is valid if its prompt is real and it generated at least one token.
    has_tokens = np.stack(masks, axis=1).sum(axis=2) > 0
    collected["valid"].append(has_tokens & (batch["example_mask"][:, None] != 0))
  arrays = {key: np.concatenate(values)[:settings.num_prompts]
            for key, values in collected.items()}
  return arrays


def _summary(stage: str, metrics: Mapping[str, float], keys: Sequence[str]) -> str:
  values = ", ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)
  return f"{stage}: {values or 'resumed at its last step'}"
