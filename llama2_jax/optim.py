"""AdamW with Llama 2's settings, learning-rate schedules and gradient accumulation.

Defaults follow Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models":
AdamW with b1 = 0.9, b2 = 0.95, eps = 1e-5, weight decay 0.1 and gradient clipping at a global
norm of 1.0 (section 2.2, kept for fine-tuning). Supervised fine-tuning uses a cosine schedule
with peak 2e-5 (section 3.1). Reward models decay on a cosine schedule to 10% of a peak of 1e-5
(5e-6 for 70B) after a warm-up of 3% of the steps, at least 5 (section 3.2.2). PPO uses a
constant 1e-6 (section 3.2.3). The paper gives no warm-up for supervised fine-tuning, so
`sft_optimizer_config` borrows the reward models' rule.

Weight decay skips norm scales and biases. They are 1-D, except when the model stacks its layers
on a leading axis for `jax.lax.scan`, so `weight_decay_mask` also matches parameter names.

Gradient accumulation is an explicit scan over micro-batches (`accumulate_gradients`), not
optax.MultiSteps. MultiSteps averages the gradients of per-micro-batch means, which weighs
micro-batches equally whatever their token counts: one token of loss 4.0 and three of loss 1.0
in two micro-batches would average to 2.5. Here each micro-batch loss is divided by the token
count of the whole batch and the gradients are summed, which gives the full-batch mean, 1.75.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Settings of the optimizer and its learning-rate schedule.

  Attributes:
    learning_rate: peak learning rate, reached at the end of the warm-up.
    schedule: "cosine" (linear warm-up, then cosine decay to final_learning_rate_fraction of the
      peak at total_steps) or "constant" (linear warm-up, then the peak).
    total_steps: optimizer steps of the whole run, warm-up included. Required for "cosine".
    warmup_steps: steps of linear warm-up from 0.
    final_learning_rate_fraction: learning rate at total_steps as a fraction of the peak.
    b1: AdamW decay rate of the first moment.
    b2: AdamW decay rate of the second moment.
    eps: AdamW epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay. The update subtracts
      learning_rate * weight_decay * param, as PyTorch's AdamW does.
    max_grad_norm: gradients above this global norm are rescaled to it. None disables it.
    num_microbatches: micro-batches per optimizer step for `accumulate_gradients`.
    no_decay_name_patterns: parameters with a path component containing one of these substrings
      (case-insensitive) get no weight decay. Parameters of fewer than 2 dimensions never do.
  """

  learning_rate: float
  schedule: str = "cosine"
  total_steps: int | None = None
  warmup_steps: int = 0
  final_learning_rate_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  max_grad_norm: float | None = 1.0
  num_microbatches: int = 1
  no_decay_name_patterns: tuple[str, ...] = ("norm", "scale", "bias")

  def __post_init__(self):
    _require(_is_real(self.learning_rate) and self.learning_rate >= 0, "learning_rate",
             self.learning_rate, "a finite number >= 0")
    _require(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
    if self.schedule == "cosine":
      _require(_is_int(self.total_steps) and self.total_steps > 0, "total_steps",
               self.total_steps, 'a positive integer when schedule is "cosine"')
    elif self.total_steps is not None:
      _require(_is_int(self.total_steps) and self.total_steps > 0, "total_steps",
               self.total_steps, "None or a positive integer")
    _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
             self.warmup_steps, "an integer >= 0")
    if self.total_steps is not None:
      _require(self.warmup_steps < self.total_steps, "warmup_steps", self.warmup_steps,
               f"less than total_steps ({self.total_steps})")
    _require(_is_real(self.final_learning_rate_fraction)
             and 0 <= self.final_learning_rate_fraction <= 1,
             "final_learning_rate_fraction", self.final_learning_rate_fraction, "in [0, 1]")
    for name in ("b1", "b2"):
      value = getattr(self, name)
      _require(_is_real(value) and 0 <= value < 1, name, value, "in [0, 1)")
    _require(_is_real(self.eps) and self.eps > 0, "eps", self.eps, "a finite number > 0")
    _require(_is_real(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             self.weight_decay, "a finite number >= 0")
    _require(self.max_grad_norm is None
             or (_is_real(self.max_grad_norm) and self.max_grad_norm > 0),
             "max_grad_norm", self.max_grad_norm, "None or a finite number > 0")
    _require(_is_int(self.num_microbatches) and self.num_microbatches > 0, "num_microbatches",
             self.num_microbatches, "a positive integer")
    _require(isinstance(self.no_decay_name_patterns, tuple)
             and all(isinstance(p, str) and p for p in self.no_decay_name_patterns),
             "no_decay_name_patterns", self.no_decay_name_patterns,
             "a tuple of non-empty strings")

  def replace(self, **changes: Any) -> OptimizerConfig:
    return dataclasses.replace(self, **changes)


def default_warmup_steps(total_steps: int) -> int:
  """Returns Llama 2's reward-model warm-up: 3% of the steps, at least 5, under total_steps."""
  return min(max(5, math.ceil(0.03 * total_steps)), total_steps - 1)


def sft_optimizer_config(
    *, total_steps: int, learning_rate: float = 2e-5, **overrides: Any) -> OptimizerConfig:
  """Builds the supervised fine-tuning optimizer: cosine decay to 10% of a peak of 2e-5."""
  if _is_int(total_steps) and total_steps > 0:  # Otherwise OptimizerConfig raises.
    overrides.setdefault("warmup_steps", default_warmup_steps(total_steps))
  return OptimizerConfig(
      learning_rate=learning_rate, schedule="cosine", total_steps=total_steps, **overrides)


def reward_model_optimizer_config(
    *, total_steps: int, learning_rate: float = 1e-5, **overrides: Any) -> OptimizerConfig:
  """Builds the reward-model optimizer: cosine decay to 10% of the peak (use 5e-6 for 70B)."""
  if _is_int(total_steps) and total_steps > 0:  # Otherwise OptimizerConfig raises.
    overrides.setdefault("warmup_steps", default_warmup_steps(total_steps))
  return OptimizerConfig(
      learning_rate=learning_rate, schedule="cosine", total_steps=total_steps, **overrides)


def ppo_optimizer_config(*, learning_rate: float = 1e-6, **overrides: Any) -> OptimizerConfig:
  """Builds the PPO optimizer: a constant learning rate of 1e-6 without warm-up."""
  return OptimizerConfig(learning_rate=learning_rate, schedule="constant", **overrides)


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Builds the schedule that maps the optimizer step count to the learning rate."""
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.final_learning_rate_fraction)
  if config.warmup_steps:
    return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.constant_schedule(config.learning_rate)


def weight_decay_mask(
    params: Any, *, no_decay_name_patterns: tuple[str, ...] = ("norm", "scale", "bias")) -> Any:
  """Marks the parameters that get weight decay: True for matrices, False for the rest.

  A parameter gets no decay if it has fewer than 2 dimensions or if a component of its path
  contains one of `no_decay_name_patterns`, case-insensitively. The name rule catches norm scales
  stacked to shape [layers, dim] by a scanned model.

  Args:
    params: pytree of arrays, e.g. Flax parameters.
    no_decay_name_patterns: substrings of path components that exclude a parameter.

  Returns:
    A pytree of bools with the structure of `params`.
  """
  patterns = tuple(p.lower() for p in no_decay_name_patterns)

  def decays(path, leaf) -> bool:
    names = [_key_name(key).lower() for key in path]
    excluded = any(pattern in name for name in names for pattern in patterns)
    return jnp.ndim(leaf) >= 2 and not excluded

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Builds global-norm clipping followed by AdamW on `config`'s schedule."""
  mask = functools.partial(
      weight_decay_mask, no_decay_name_patterns=config.no_decay_name_patterns)
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(config),
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=mask)
  if config.max_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
    params: Any,
    batch: Any,
    *,
    num_microbatches: int,
) -> tuple[jax.Array, Any, Any]:
  """Sums the loss and gradients of `loss_fn` over micro-batches with `jax.lax.scan`.

  The sum equals the full-batch gradient only if each micro-batch loss is already divided by the
  denominator of the whole batch, such as the `normalizer` argument of the losses in
  `llama2_jax.losses` set to the batch's token count. Micro-batch m contains rows m, m + M,
  m + 2M, ... of the batch (M = num_microbatches), so that every micro-batch stays spread over
  the devices of a data-parallel batch axis. Gradients are summed in float32 and returned in the
  dtype of each parameter.

  Args:
    loss_fn: `(params, micro_batch) -> (loss, metrics)`.
    params: pytree of parameters to differentiate.
    batch: pytree of arrays with a common leading batch axis divisible by num_microbatches.
    num_microbatches: M, the number of micro-batches.

  Returns:
    (loss, grads, metrics): the summed loss and gradients, and each micro-batch's metrics stacked
    on a new leading axis of size M. Sum the `*_sum` and count entries over that axis.

  Raises:
    ValueError: if num_microbatches is not positive or does not divide the batch size.
  """
  batch_sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
  if len(batch_sizes) != 1:
    raise ValueError(f"batch leaves must share one leading size, got {sorted(batch_sizes)}.")
  batch_size = batch_sizes.pop()
  if not _is_int(num_microbatches) or num_microbatches <= 0 or batch_size % num_microbatches:
    raise ValueError(
        f"num_microbatches is {num_microbatches!r}, but it must be a positive integer that "
        f"divides the batch size {batch_size}.")

  def split(leaf):
    leaf = jnp.asarray(leaf)
    strided = leaf.reshape((batch_size // num_microbatches, num_microbatches) + leaf.shape[1:])
    return jnp.swapaxes(strided, 0, 1)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(carry, micro_batch):
    loss_sum, grad_sums = carry
    (loss, metrics), grads = grad_fn(params, micro_batch)
    grad_sums = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grad_sums, grads)
    return (loss_sum + loss.astype(jnp.float32), grad_sums), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), zeros)
  (loss, grads), metrics = jax.lax.scan(step, init, jax.tree.map(split, batch))
  grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
  return loss, grads, metrics


def _require(condition: bool, field: str, value: Any, rule: str) -> None:
  if not condition:
    raise ValueError(f"OptimizerConfig.{field} is {value!r}, but it must be {rule}.")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _key_name(key: Any) -> str:
  """Returns the name of one pytree path entry (dict key, attribute or sequence index)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)
