"""Tests of the optimizer factory, its schedules, weight decay mask and gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama2_jax import optim
from llama2_jax.losses import sft_loss


def test_defaults_match_llama2():
  config = optim.OptimizerConfig(learning_rate=1e-5, total_steps=100)
  assert (config.b1, config.b2, config.eps) == (0.9, 0.95, 1e-5)
  assert config.weight_decay == 0.1
  assert config.max_grad_norm == 1.0
  assert config.final_learning_rate_fraction == 0.1


def test_cosine_schedule_values():
  # Warm-up 0 -> 1 over steps 0..2, then cosine from 1 at step 2 to 0.1 at step 10. At the
  # midpoint, step 6, the cosine factor is 0.5: 0.1 + 0.9 * 0.5 = 0.55.
  schedule = optim.learning_rate_schedule(
      optim.OptimizerConfig(learning_rate=1.0, total_steps=10, warmup_steps=2))
  assert schedule(0) == 0.0
  assert schedule(1) == pytest.approx(0.5)
  assert schedule(2) == pytest.approx(1.0)
  assert schedule(6) == pytest.approx(0.55, rel=1e-5)
  assert schedule(10) == pytest.approx(0.1)
  assert schedule(50) == pytest.approx(0.1)


def test_ppo_learning_rate_is_constant():
  schedule = optim.learning_rate_schedule(optim.ppo_optimizer_config())
  assert schedule(0) == pytest.approx(1e-6)
  assert schedule(10_000) == pytest.approx(1e-6)


def test_constant_schedule_with_warmup():
  schedule = optim.learning_rate_schedule(
      optim.OptimizerConfig(learning_rate=2.0, schedule="constant", warmup_steps=4))
  assert schedule(1) == pytest.approx(0.5)
  assert schedule(100) == pytest.approx(2.0)


@pytest.mark.parametrize("total_steps, expected", [(1000, 30), (100, 5), (3, 2), (1, 0)])
def test_reward_model_warmup(total_steps, expected):
  # 3% of the steps, at least 5, and always shorter than the run.
  config = optim.reward_model_optimizer_config(total_steps=total_steps)
  assert config.warmup_steps == expected


def test_presets_use_llama2_peaks():
  assert optim.sft_optimizer_config(total_steps=100).learning_rate == 2e-5
  assert optim.reward_model_optimizer_config(total_steps=100).learning_rate == 1e-5
  assert optim.ppo_optimizer_config().schedule == "constant"


@pytest.mark.parametrize("make_config, peak", [
    (optim.sft_optimizer_config, 2e-5),
    (optim.reward_model_optimizer_config, 1e-5),
])
def test_presets_warm_up_then_decay_to_ten_percent(make_config, peak):
  # 100 steps: a warm-up of max(5, ceil(0.03 * 100)) = 5 steps up to the peak, then cosine decay
  # to 10% of the peak at step 100.
  config = make_config(total_steps=100)
  schedule = optim.learning_rate_schedule(config)
  assert schedule(0) == 0.0
  assert schedule(5) == pytest.approx(peak)
  assert schedule(100) == pytest.approx(0.1 * peak)
  assert (config.b1, config.b2, config.eps) == (0.9, 0.95, 1e-5)
  assert (config.weight_decay, config.max_grad_norm) == (0.1, 1.0)


def test_ppo_preset_keeps_adamw_defaults():
  config = optim.ppo_optimizer_config()
  assert config.warmup_steps == 0
  assert (config.b1, config.b2, config.eps) == (0.9, 0.95, 1e-5)
  assert (config.weight_decay, config.max_grad_norm) == (0.1, 1.0)


def test_default_moments_reach_adam():
  # Learning rate 1, no decay or clipping, and the default b1 0.9, b2 0.95 and eps 1e-5. The
  # gradient is 1, then 0.
  # Step 1: m = 0.1 and v = 0.05 are bias-corrected to 1 and 1, so the update is -1 / (1 + 1e-5).
  # Step 2: m = 0.9 * 0.1 = 0.09, v = 0.95 * 0.05 = 0.0475, bias-corrected to
  # 0.09 / (1 - 0.9^2) = 0.4736842 and 0.0475 / (1 - 0.95^2) = 0.4871795, so the update is
  # -0.4736842 / (sqrt(0.4871795) + 1e-5) = -0.6786380.
  config = optim.OptimizerConfig(learning_rate=1.0, schedule="constant", weight_decay=0.0,
                                 max_grad_norm=None)
  optimizer = optim.make_optimizer(config)
  params = {"w": jnp.zeros(1)}
  state = optimizer.init(params)
  first, state = optimizer.update({"w": jnp.ones(1)}, state, params)
  second, _ = optimizer.update({"w": jnp.zeros(1)}, state, params)
  assert first["w"][0] == pytest.approx(-1.0 / (1.0 + 1e-5), rel=1e-6)
  assert second["w"][0] == pytest.approx(-0.6786380, rel=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(learning_rate=-1.0), "learning_rate is -1.0, but it must be a finite number >= 0"),
    (dict(learning_rate=float("inf")), "learning_rate is inf"),
    (dict(schedule="linear"), "schedule is 'linear', but it must be one of"),
    (dict(total_steps=None), "total_steps is None, but it must be a positive integer when"),
    (dict(total_steps=0), "total_steps is 0"),
    (dict(warmup_steps=-1), "warmup_steps is -1, but it must be an integer >= 0"),
    (dict(warmup_steps=100), r"warmup_steps is 100, but it must be less than total_steps \(100\)"),
    (dict(final_learning_rate_fraction=1.5), r"final_learning_rate_fraction is 1.5, .* \[0, 1\]"),
    (dict(b1=1.0), r"b1 is 1.0, but it must be in \[0, 1\)"),
    (dict(b2=-0.1), r"b2 is -0.1, but it must be in \[0, 1\)"),
    (dict(eps=0.0), "eps is 0.0, but it must be a finite number > 0"),
    (dict(weight_decay=-0.1), "weight_decay is -0.1"),
    (dict(max_grad_norm=0.0), "max_grad_norm is 0.0, but it must be None or"),
    (dict(num_microbatches=0), "num_microbatches is 0, but it must be a positive integer"),
    (dict(num_microbatches=True), "num_microbatches is True"),
    (dict(no_decay_name_patterns=["norm"]), "no_decay_name_patterns is"),
])
def test_config_rejects_invalid_field(changes, message):
  fields = dict(learning_rate=1e-5, total_steps=100) | changes
  with pytest.raises(ValueError, match="OptimizerConfig." + message):
    optim.OptimizerConfig(**fields)


def test_config_is_frozen():
  config = optim.ppo_optimizer_config()
  with pytest.raises(AttributeError):
    config.learning_rate = 1.0


def _params():
  return {
      "embed": jnp.ones((8, 4)),
      "layers": {
          "attention_norm": {"scale": jnp.ones((2, 4))},  # Stacked over 2 scanned layers.
          "wq": jnp.ones((2, 4, 4)),
      },
      "norm": {"scale": jnp.ones(4)},
      "head_bias": jnp.ones(8),
  }


def test_decay_mask_skips_norms_and_vectors():
  mask = optim.weight_decay_mask(_params())
  assert mask["embed"] is True
  assert mask["layers"]["wq"] is True
  assert mask["layers"]["attention_norm"]["scale"] is False
  assert mask["norm"]["scale"] is False
  assert mask["head_bias"] is False


def test_weight_decay_spares_norm_scales():
  # With zero gradients Adam's term is 0, so the update is -lr * weight_decay * param:
  # 1 - 0.1 * 0.1 = 0.99 for matrices, and 1 for the parameters the mask excludes.
  config = optim.OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.1)
  optimizer = optim.make_optimizer(config)
  params = _params()
  updates, _ = jax.jit(optimizer.update)(
      jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
  new_params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new_params["embed"], 0.99, rtol=1e-6)
  np.testing.assert_allclose(new_params["layers"]["wq"], 0.99, rtol=1e-6)
  np.testing.assert_array_equal(new_params["layers"]["attention_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(new_params["norm"]["scale"], 1.0)


@pytest.mark.parametrize("max_grad_norm, expected", [(1.0, -0.5), (None, -10.0 / 11.0)])
def test_gradient_clipping(max_grad_norm, expected):
  # A gradient of 10 clipped to norm 1 gives Adam's first update -lr * 1 / (1 + eps). Unclipped,
  # it is -lr * 10 / (10 + eps). With eps = 1 the two differ visibly: -0.5 and -10/11.
  config = optim.OptimizerConfig(learning_rate=1.0, schedule="constant", eps=1.0,
                                 weight_decay=0.0, max_grad_norm=max_grad_norm)
  optimizer = optim.make_optimizer(config)
  params = {"w": jnp.zeros(1)}
  updates, _ = optimizer.update({"w": jnp.asarray([10.0])}, optimizer.init(params), params)
  assert updates["w"][0] == pytest.approx(expected, rel=1e-6)


def _linear_model_batch():
  """Four rows of 3 positions with 1, 3, 2 and 0 answer tokens."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
  batch = {
      "inputs": jnp.asarray(rng.normal(size=(4, 3, 4)), jnp.float32),
      "targets": jnp.asarray(rng.integers(0, 5, size=(4, 3)), jnp.int32),
      "mask": jnp.asarray([[1, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 0]]),
  }
  return params, batch


def _loss_fn(params, batch, normalizer=None):
  logits = jnp.einsum("btd,dv->btv", batch["inputs"], params["w"])
  return sft_loss(logits_BxTxV=logits, targets_BxT=batch["targets"],
                  loss_mask_BxT=batch["mask"], normalizer=normalizer)


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_accumulation_matches_full_batch(num_microbatches):
  params, batch = _linear_model_batch()
  full_value_and_grad = jax.jit(jax.value_and_grad(_loss_fn, has_aux=True))
  (full_loss, _), full_grads = full_value_and_grad(params, batch)
  loss_fn = functools.partial(_loss_fn, normalizer=batch["mask"].sum())
  accumulate = jax.jit(optim.accumulate_gradients, static_argnums=0,
                       static_argnames="num_microbatches")
  loss, grads, metrics = accumulate(loss_fn, params, batch, num_microbatches=num_microbatches)
  assert loss == pytest.approx(float(full_loss), rel=1e-5)
  np.testing.assert_allclose(grads["w"], full_grads["w"], rtol=1e-5, atol=1e-6)
  assert metrics["sft/tokens"].shape == (num_microbatches,)
  assert metrics["sft/tokens"].sum() == 6


def test_microbatch_rows_are_strided():
  # With 2 micro-batches, rows {0, 2} contain 1 + 2 answer tokens and rows {1, 3} contain 3 + 0.
  # Contiguous halves would contain 4 and 2.
  params, batch = _linear_model_batch()
  _, _, metrics = optim.accumulate_gradients(_loss_fn, params, batch, num_microbatches=2)
  np.testing.assert_array_equal(metrics["sft/tokens"], [3, 3])


def test_accumulation_keeps_param_dtype():
  params, batch = _linear_model_batch()
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  _, grads, _ = optim.accumulate_gradients(_loss_fn, params, batch, num_microbatches=2)
  assert grads["w"].dtype == jnp.bfloat16


def test_accumulation_rejects_uneven_split():
  params, batch = _linear_model_batch()
  with pytest.raises(ValueError, match="num_microbatches is 3, but .* divides the batch size 4"):
    optim.accumulate_gradients(_loss_fn, params, batch, num_microbatches=3)
