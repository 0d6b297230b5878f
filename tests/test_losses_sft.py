"""Tests of the supervised fine-tuning loss and the token log-probability helper."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import losses

# Jitted once per shape: compiling a whole function is faster on CPU than dispatching op by op.
sft_loss = jax.jit(losses.sft_loss)
token_logprobs = jax.jit(losses.token_logprobs)


def _normal(seed, shape, scale=1.0):
  """Returns float32 normal noise drawn with numpy, which compiles nothing."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _logits_for_loss(loss: float) -> list[float]:
  """Returns two logits whose cross-entropy on target 0 is `loss`.

  With logits [0, c] the loss on target 0 is log(1 + e^c), so c = log(e^loss - 1).
  """
  return [0.0, math.log(math.expm1(loss))]


def _uneven_batch():
  """Row 0 has one answer token of loss 4.0, row 1 three answer tokens of loss 1.0.

  The token mean is (4 + 3 * 1) / 4 = 1.75; the mean of the two row means would be 2.5.
  """
  logits = [
      [_logits_for_loss(4.0), _logits_for_loss(9.0), _logits_for_loss(9.0)],
      [_logits_for_loss(1.0)] * 3,
  ]
  return dict(
      logits_BxTxV=jnp.asarray(logits),
      targets_BxT=jnp.zeros((2, 3), jnp.int32),
      loss_mask_BxT=jnp.asarray([[1, 0, 0], [1, 1, 1]]))


def test_token_logprobs_matches_log_softmax():
  logits = _normal(0, (2, 3, 5))
  targets = jnp.asarray([[0, 4, 2], [1, 1, 3]])
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(token_logprobs(logits, targets), expected, rtol=1e-6, atol=1e-6)


def test_token_logprobs_upcasts_bfloat16():
  logits = jnp.ones((1, 2, 4), jnp.bfloat16)
  assert token_logprobs(logits, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.float32


def test_loss_averages_over_tokens():
  loss, metrics = sft_loss(**_uneven_batch())
  assert loss == pytest.approx(1.75, rel=1e-5)
  assert metrics["sft/loss_sum"] == pytest.approx(7.0, rel=1e-5)
  assert metrics["sft/tokens"] == 4
  assert metrics["sft/loss"] == pytest.approx(1.75, rel=1e-5)


def test_microbatches_sum_to_full_batch():
  batch = _uneven_batch()
  full_loss, _ = sft_loss(**batch)
  rows = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(2)]
  # Each micro-batch divides by the 4 tokens of the whole batch: 4 / 4 + 3 / 4 = 1.75.
  micro_losses = [sft_loss(**row, normalizer=4.0)[0] for row in rows]
  assert sum(micro_losses) == pytest.approx(float(full_loss), rel=1e-6)


def test_microbatch_gradients_match_full_batch():
  batch = _uneven_batch()

  def loss_of_logits(logits, rows, normalizer=None):
    return sft_loss(
        logits_BxTxV=logits, targets_BxT=batch["targets_BxT"][rows],
        loss_mask_BxT=batch["loss_mask_BxT"][rows], normalizer=normalizer)[0]

  full_grad = jax.grad(loss_of_logits)(batch["logits_BxTxV"], slice(0, 2))
  micro_grads = [
      jax.grad(loss_of_logits)(batch["logits_BxTxV"][i:i + 1], slice(i, i + 1), 4.0)
      for i in range(2)]
  np.testing.assert_allclose(jnp.concatenate(micro_grads), full_grad, rtol=1e-6, atol=1e-7)


def test_mean_of_microbatch_means_differs():
  batch = _uneven_batch()
  rows = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(2)]
  # Without the whole-batch normalizer the micro-batch losses are 4.0 and 1.0, mean 2.5.
  micro_losses = [float(sft_loss(**row)[0]) for row in rows]
  assert np.mean(micro_losses) == pytest.approx(2.5, rel=1e-5)


def test_all_masked_batch_gives_zero():
  batch = _uneven_batch()
  batch["loss_mask_BxT"] = jnp.zeros((2, 3), jnp.int32)
  loss, metrics = sft_loss(**batch)
  assert loss == 0.0
  assert metrics["sft/tokens"] == 0
  assert metrics["sft/loss"] == 0.0


def test_padding_changes_nothing():
  batch = _uneven_batch()
  loss, metrics = sft_loss(**batch)

  # Two padded positions per row with large random logits and out-of-vocabulary targets, and a
  # fully padded third row.
  padded_logits = np.array(_normal(1, (3, 5, 2), scale=1e4))
  padded_logits[:2, :3] = batch["logits_BxTxV"]
  padded_targets = np.full((3, 5), 7, np.int32)
  padded_targets[:2, :3] = batch["targets_BxT"]
  padded_mask = np.zeros((3, 5), np.int32)
  padded_mask[:2, :3] = batch["loss_mask_BxT"]
  padded_loss, padded_metrics = sft_loss(
      logits_BxTxV=padded_logits, targets_BxT=padded_targets, loss_mask_BxT=padded_mask)

  assert padded_loss == pytest.approx(float(loss), rel=1e-6)
  for key, value in metrics.items():
    assert padded_metrics[key] == pytest.approx(float(value), rel=1e-6), key


def test_padding_gets_zero_gradient():
  noise = _normal(2, (1, 3, 4), scale=1e4)
  mask = jnp.asarray([[1, 1, 0]])
  targets = jnp.asarray([[0, 1, 9]])  # 9 is outside the vocabulary, at a padded position.

  def loss_of_logits(logits):
    return sft_loss(logits_BxTxV=logits, targets_BxT=targets, loss_mask_BxT=mask)[0]

  grad = jax.grad(loss_of_logits)(noise)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0, 2], 0.0)


def test_gradient_is_softmax_minus_onehot():
  logits = _normal(3, (2, 3, 5))
  targets = jnp.asarray([[0, 4, 2], [1, 1, 3]])
  mask = jnp.asarray([[1, 1, 0], [1, 0, 1]])

  def loss_of_logits(logits):
    return sft_loss(logits_BxTxV=logits, targets_BxT=targets, loss_mask_BxT=mask)[0]

  # d(-log softmax(l)[y]) / dl = softmax(l) - onehot(y), averaged over the 4 answer tokens.
  expected = (jax.nn.softmax(logits) - jax.nn.one_hot(targets, 5)) * mask[..., None] / 4.0
  np.testing.assert_allclose(jax.grad(loss_of_logits)(logits), expected, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_argmax_hits():
  logits = jnp.asarray([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
  targets = jnp.asarray([[0, 0, 1]])
  mask = jnp.asarray([[1, 1, 0]])
  # Position 0 is a hit, position 1 a miss, position 2 is masked.
  _, metrics = sft_loss(logits_BxTxV=logits, targets_BxT=targets, loss_mask_BxT=mask)
  assert metrics["sft/correct_sum"] == 1
  assert metrics["sft/accuracy"] == pytest.approx(0.5)
