"""Stage 5: PPO from the rejection-sampling policy against its frozen copy.

Each iteration samples one response per prompt of a rollout, scores it with the combined reward
of both reward models and the KL penalty (`rollout.score_rollout`), then takes
`epochs * rollout_size / minibatch_size` PPO updates (`steps.ppo.ppo_step`) in one compiled
program. The value model starts from the helpfulness reward model: both heads share the
parameter names, so the value head starts from the reward head.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax import sharding
from llama2_jax.data.batchers import PromptBatcher
from llama2_jax.data.iterators import BatchIterator
from llama2_jax.model import param_axes
from llama2_jax.optim import make_optimizer, ppo_optimizer_config
from llama2_jax.pipeline.context import DeviceBatches, RunContext, replicated
from llama2_jax.pipeline.loop import run_loop
from llama2_jax.pipeline.policy import PolicyScorer, sample_responses
from llama2_jax.rollout import RolloutConfig, score_rollout
from llama2_jax.steps.ppo import PPOState, ppo_step
from llama2_jax.train_state import TrainState, state_shardings

PPO_BATCH_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values",
                  "advantages", "returns")
PROMPT_KEYS = ("prompt_tokens", "prompt_mask", "is_safety")


@flax.struct.dataclass
class PPOLoopState:
  """The PPO state with the loop's iteration count, base key and data position.

  `step` counts PPO iterations (rollouts), so the checkpoint step is the iteration.
  """

  ppo: PPOState
  step: jax.Array
  rng: jax.Array
  data_state: dict[str, jax.Array]

  def with_data_state(self, data_state: Mapping[str, int]) -> PPOLoopState:
    return self.replace(data_state={
        name: jax.device_put(np.asarray(value, np.int32), self.data_state[name].sharding)
        for name, value in data_state.items()})

  def data_state_ints(self) -> dict[str, int]:
    return {name: int(jax.device_get(value)) for name, value in self.data_state.items()}


def run_ppo(ctx: RunContext, scorer: PolicyScorer, *, stage: str, round_index: int,
            policy_stage: str) -> str:
  """Runs PPO from `policy_stage`'s policy, which is also the frozen reference.

  Args:
    ctx: the run.
    scorer: both reward models.
    stage: this stage's name, e.g. "ppo" or "ppo_2".
    round_index: the RLHF round, from 1; each round draws its own prompt order and samples.
    policy_stage: the rejection-sampling stage of the same round.
  """
  settings = ctx.settings.ppo
  mesh = ctx.mesh
  policy_model, value_model = ctx.policy_model, ctx.value_model
  policy_params = ctx.final_params(policy_stage, policy_model)
  value_params = ctx.final_params("reward_helpfulness", value_model)
  optim = dataclasses.asdict(ctx.settings.optim)
  optim.pop("final_learning_rate_fraction")  # The PPO learning rates are constant.
  policy_tx = make_optimizer(ppo_optimizer_config(learning_rate=settings.learning_rate, **optim))
  value_tx = make_optimizer(ppo_optimizer_config(learning_rate=settings.value_learning_rate,
                                                 **optim))

  sampling = settings.sampling
  config = ctx.batch_config(settings.rollout_size, sampling.max_prompt_length,
                            seed_offset=100 * round_index + 8)
  iterator = BatchIterator(ctx.records("rl_prompts", "train"),
                           PromptBatcher(ctx.tokenizer, config), config)
  batches = DeviceBatches(iterator, mesh, settings.rollout_size,
                          lambda batch: {key: batch[key] for key in PROMPT_KEYS})
  initial_data_state = batches.get_state()
  seed = ctx.settings.seed

  def build(policy, value):
    key = jax.random.key(seed + 13)
    return PPOLoopState(
        ppo=PPOState(policy=TrainState.create(params=policy, tx=policy_tx, rng=key),
                     value=TrainState.create(params=value, tx=value_tx, rng=key),
                     ref_params=policy),
        step=jnp.zeros((), jnp.int32), rng=key,
        data_state={name: jnp.asarray(value, jnp.int32)
                    for name, value in initial_data_state.items()})

  abstract = jax.eval_shape(build, policy_params, value_params)
  rep = replicated(mesh)
  shardings = abstract.replace(
      ppo=PPOState(
          policy=state_shardings(abstract.ppo.policy, param_axes(policy_model), mesh),
          value=state_shardings(abstract.ppo.value, param_axes(value_model), mesh),
          ref_params=sharding.tree_shardings(abstract.ppo.ref_params, param_axes(policy_model),
                                             mesh)),
      step=rep, rng=rep, data_state={name: rep for name in abstract.data_state})
  create = lambda: sharding.create_sharded(build, shardings, policy_params, value_params)

  num_minibatches = settings.rollout_size // settings.minibatch_size

  def update(state: PPOLoopState, rollout: dict) -> tuple[PPOLoopState, dict]:
    """`epochs` passes over the rollout in shuffled minibatches, as one scan."""
    key = jax.random.fold_in(state.rng, state.step)
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, epoch),
                                                    settings.rollout_size)
                             for epoch in range(settings.epochs)])
    order = order.reshape(settings.epochs * num_minibatches, settings.minibatch_size)

    def minibatch_update(ppo_state, rows):
      minibatch = jax.tree.map(lambda leaf: leaf[rows], rollout)
      return ppo_step(ppo_state, minibatch, key, policy_model=policy_model,
                      value_model=value_model, clip_epsilon=settings.clip_epsilon,
                      value_clip_epsilon=settings.value_clip_epsilon,
                      entropy_coef=settings.entropy_coef)

    ppo_state, stacked = jax.lax.scan(minibatch_update, state.ppo, order)
    # Means over minibatches of equal size; the sums and counts are totals over the passes.
    metrics = {name: (jnp.sum(value) if name.endswith(("_sum", "tokens")) else jnp.mean(value))
               for name, value in stacked.items()}
    return state.replace(ppo=ppo_state, step=state.step + 1), metrics

  update_jit = jax.jit(update, out_shardings=(shardings, rep), donate_argnums=(0,))
  rollout_config = RolloutConfig(kl_coef=settings.kl_coef, kl_estimator=settings.kl_estimator,
                                 gamma=settings.gamma, lam=settings.lam,
                                 safety_threshold=settings.safety_threshold)

  def iteration(state: PPOLoopState, prompts: dict) -> tuple[PPOLoopState, dict]:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed + 17), round_index),
                             int(jax.device_get(state.step)))
    output = sample_responses(ctx, state.ppo.policy.params, prompts["prompt_tokens"],
                              prompts["prompt_mask"], key, sampling)
    rollout, rollout_metrics = score_rollout(
        policy_model=policy_model, value_model=value_model, reward_model=ctx.reward_model,
        policy_params=state.ppo.policy.params, ref_params=state.ppo.ref_params,
        value_params=state.ppo.value.params, helpfulness_params=scorer.helpfulness_params,
        safety_params=scorer.safety_params,
        helpfulness_statistics=scorer.helpfulness_statistics,
        safety_statistics=scorer.safety_statistics,
        prompt_tokens_BxP=prompts["prompt_tokens"], prompt_mask_BxP=prompts["prompt_mask"],
        is_safety_B=prompts["is_safety"], sample=output, config=rollout_config)
    state, metrics = update_jit(state, {key: rollout[key] for key in PPO_BATCH_KEYS})
    metrics.update(rollout_metrics)
    metrics["ppo/helpfulness_reward"] = jnp.mean(rollout["helpfulness_scores"])
    metrics["ppo/safety_reward"] = jnp.mean(rollout["safety_scores"])
    metrics["ppo/response_length"] = jnp.mean(jnp.sum(output.mask_BxT, axis=1))
    return state, metrics

  checkpoint_every = max(1, min(ctx.settings.checkpoint_every, settings.iterations // 4))
  state, metrics = run_loop(
      ctx.loop_settings(stage, settings.iterations, ("ppo/policy_loss", "ppo/value_loss"),
                        checkpoint_every=checkpoint_every),
      create_state=create, abstract_state=sharding.with_shardings(abstract, shardings),
      step_fn=iteration, batches=batches, get_data_state=batches.get_state,
      set_data_state=batches.set_state, metadata={"config": ctx.resolved_config})
  ctx.finish_stage(stage, state.ppo.policy.params, {"metrics": metrics, "round": round_index})
  values = ", ".join(f"{key} {metrics[key]:.4g}" for key in ("ppo/score", "ppo/kl",
                                                            "ppo/clip_fraction")
                    if key in metrics)
  return f"{stage}: {values or 'resumed at its last iteration'}"
