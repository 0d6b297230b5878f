"""Pieces shared by the train steps: metric reduction over micro-batches."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax


def reduce_microbatch_metrics(stacked: Mapping[str, jax.Array],
                              means: Mapping[str, tuple[str, str]]) -> dict[str, jax.Array]:
  """Sums the sums and counts over the micro-batch axis, then recomputes the means from them.

  Args:
    stacked: metrics of every micro-batch, each with a leading axis of size M.
    means: mean key -> (sum key, count key). These keys are recomputed; every other key is
      summed, so only sums and counts may be left out of `means`.
  """
  totals = {key: jnp.sum(value, axis=0) for key, value in stacked.items() if key not in means}
  for mean_key, (sum_key, count_key) in means.items():
    if sum_key in totals:
      totals[mean_key] = totals[sum_key] / jnp.maximum(totals[count_key], 1.0)
  return totals


def gradient_metrics(prefix: str, grads) -> dict[str, jax.Array]:
  """Returns the global gradient norm before clipping, under `<prefix>/grad_norm`."""
  return {f"{prefix}/grad_norm": optax.tree.norm(grads)}
