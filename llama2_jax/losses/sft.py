"""Supervised fine-tuning loss: next-token cross-entropy on answer tokens.

Axis letters: B is the batch, T the sequence position and V the vocabulary. Logits at position t
predict the target at position t, so callers shift the targets by one before calling.

Llama 2-Chat's supervised fine-tuning zeroes the loss on prompt tokens and trains on answer tokens
only (Touvron et al., 2023, section 3.1). `loss_mask_BxT` carries that choice: it is nonzero on
answer tokens and zero on prompt tokens and padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def token_logprobs(logits_BxTxV: ArrayLike, targets_BxT: ArrayLike) -> jax.Array:
  """Computes the log-probability of each target token under the logits, in float32.

  log p(target) = logit[target] - logsumexp(logits). The logits are upcast to float32 first,
  because bfloat16 keeps 8 significant bits, too coarse for log-probabilities that later get
  summed over thousands of tokens or exponentiated into PPO ratios.

  Args:
    logits_BxTxV: unnormalised scores of any float dtype.
    targets_BxT: integer token ids. A negative id indexes from the end of the vocabulary and an id
      of V or more gives NaN, so mask such padding positions out of any sum.

  Returns:
    logprobs_BxT in float32.
  """
  logits_BxTxV = jnp.asarray(logits_BxTxV, jnp.float32)
  targets_BxT = jnp.asarray(targets_BxT, jnp.int32)
  target_logits_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return target_logits_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def sft_loss(
    *,
    logits_BxTxV: ArrayLike,
    targets_BxT: ArrayLike,
    loss_mask_BxT: ArrayLike,
    normalizer: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Computes the token-averaged cross-entropy of the targets, in float32.

  loss = sum_{b,t} mask[b,t] * -log p(targets[b,t]) / normalizer, the answer-only
  negative log-likelihood of Llama 2-Chat's supervised fine-tuning (Touvron et al., 2023,
  section 3.1).

  The average is over every answer token of the batch, not per sequence, so a batch of one token
  with loss 4.0 and three with loss 1.0 scores 1.75 (the mean of sequence means would be 2.5).
  To split a batch into micro-batches and still get the full-batch gradient, pass the token count
  of the whole batch as `normalizer` to every micro-batch call and sum the gradients.

  Args:
    logits_BxTxV: unnormalised scores of any float dtype, upcast to float32.
    targets_BxT: integer token ids that the logits at the same position should predict.
    loss_mask_BxT: nonzero on answer tokens, zero on prompt tokens and padding. Values at masked
      positions never enter the loss, the metrics or the gradient.
    normalizer: scalar denominator of the average. None means the number of answer tokens in
      this call, or 1 when there are none, so an all-masked batch gives loss 0.

  Returns:
    (loss, metrics). The metrics hold sums with their denominators so that they add up exactly
    across micro-batches: `sft/loss_sum`, `sft/correct_sum` (targets that are the argmax of the
    logits), `sft/tokens`, and the per-token means `sft/loss` and `sft/accuracy` of this call.
  """
  mask_BxT = jnp.asarray(loss_mask_BxT) != 0
  logprobs_BxT = token_logprobs(logits_BxTxV, targets_BxT)

  # jnp.where, not a product, so a NaN or inf at a masked position cannot reach the sum.
  nll_BxT = jnp.where(mask_BxT, -logprobs_BxT, 0.0)
  loss_sum = nll_BxT.sum()
  tokens = mask_BxT.sum().astype(jnp.float32)
  if normalizer is None:
    normalizer = jnp.maximum(tokens, 1.0)
  loss = loss_sum / jnp.asarray(normalizer, jnp.float32)

  predictions_BxT = jnp.argmax(jnp.asarray(logits_BxTxV), axis=-1)
  correct_BxT = mask_BxT & (predictions_BxT == jnp.asarray(targets_BxT))
  correct_sum = correct_BxT.sum().astype(jnp.float32)

  metrics = {
      "sft/loss_sum": jax.lax.stop_gradient(loss_sum),
      "sft/correct_sum": correct_sum,
      "sft/tokens": tokens,
      "sft/loss": jax.lax.stop_gradient(loss_sum) / jnp.maximum(tokens, 1.0),
      "sft/accuracy": correct_sum / jnp.maximum(tokens, 1.0),
  }
  return loss, metrics
