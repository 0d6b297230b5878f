"""Supervised fine-tuning step: next-token cross-entropy on answer tokens only."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from llama2_jax.losses.sft import sft_loss
from llama2_jax.model import Llama
from llama2_jax.optim import accumulate_gradients
from llama2_jax.steps.common import gradient_metrics, reduce_microbatch_metrics
from llama2_jax.train_state import TrainState

SFT_MEANS = {"sft/loss": ("sft/loss_sum", "sft/tokens"),
             "sft/accuracy": ("sft/correct_sum", "sft/tokens")}


def sft_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
             model: Llama, num_microbatches: int = 1) -> tuple[TrainState, dict]:
  """Takes one optimizer step on the SFT loss of a batch.

  Args:
    state: the policy's training state.
    batch: int32 [B, L] arrays `tokens`, `targets`, `loss_mask` (aligned with the logits: the
      logits at t predict `targets[t]`), `attention_mask` and `segment_ids` (packed rows), as
      built by `llama2_jax.data.sft.sft_batch`.
    rng: unused, because the model has no dropout; kept so every step has one signature.
    model: the `Llama` with the "lm" head.
    num_microbatches: split the batch into this many micro-batches and sum their gradients. The
      loss is normalised by the answer-token count of the whole batch, so the update equals the
      one of the full batch.

  Returns:
    (new_state, metrics) with `sft/loss`, `sft/accuracy`, their sums and `sft/tokens`, and
    `sft/grad_norm`.
  """
  del rng
  normalizer = jnp.maximum(jnp.sum(batch["loss_mask"] != 0).astype(jnp.float32), 1.0)

  def loss_fn(params, micro_batch):
    logits_BxLxV = model.apply(params, micro_batch["tokens"], micro_batch["attention_mask"],
                               segment_ids_BxL=micro_batch["segment_ids"])
    return sft_loss(logits_BxTxV=logits_BxLxV, targets_BxT=micro_batch["targets"],
                    loss_mask_BxT=micro_batch["loss_mask"], normalizer=normalizer)

  inputs = {key: batch[key] for key in ("tokens", "targets", "loss_mask", "attention_mask",
                                         "segment_ids")}
  _, grads, stacked = accumulate_gradients(loss_fn, state.params, inputs,
                                           num_microbatches=num_microbatches)
  metrics = reduce_microbatch_metrics(stacked, SFT_MEANS)
  metrics.update(gradient_metrics("sft", grads))
  return state.apply_gradients(grads), metrics
