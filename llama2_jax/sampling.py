"""Batched sampling with a KV cache, compiled once per shape.

Prompts are left-padded to a common length P, so every row's last prompt token sits at slot
P - 1 and every row writes its t-th new token to slot P + t. The prompt is prefilled in
fixed-size chunks, then `jax.lax.while_loop` generates one token per iteration for the whole
batch until every row has produced EOS or `max_new_tokens` tokens. Temperature, top-k and top-p
are traced values, so sweeping them (as a diversity-versus-temperature evaluation does) reuses one
compiled program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama2_jax.model import KVCache, Llama, init_cache

_EXCLUDED_LOGIT = -1e30


class SampleOutput(NamedTuple):
  """Generated continuations, right-padded to `max_new_tokens` (T).

  Attributes:
    tokens_BxT: generated token ids; `pad_id` after a row has stopped.
    mask_BxT: 1 for generated tokens, including the EOS that stopped the row, else 0.
    logprobs_BxT: log-probability of each generated token under the model's own distribution,
      log_softmax(logits), before temperature, top-k and top-p. This is the policy's
      log-probability that PPO's ratio and KL use. 0 where mask is 0.
    sampling_logprobs_BxT: log-probability under the distribution actually sampled from, after
      temperature, top-k and top-p (0 for greedy steps, where that distribution is a point mass).
    lengths_B: number of generated tokens per row.
  """

  tokens_BxT: jax.Array
  mask_BxT: jax.Array
  logprobs_BxT: jax.Array
  sampling_logprobs_BxT: jax.Array
  lengths_B: jax.Array


def filter_logits(logits_BxV: jax.Array, *, temperature, top_k, top_p) -> jax.Array:
  """Applies temperature, then top-k, then top-p; excluded tokens get a large negative logit.

  Top-p keeps the smallest set of most likely tokens whose total probability reaches `top_p`
  (Holtzman et al., 2020): a token is kept when the probability of the tokens ranked above it is
  still below `top_p`. `top_k` of 0 and `top_p` of 1 disable those filters; the sort they need
  runs only when one of them is active. A temperature of 0 is treated as 1 here; the caller
  takes the argmax instead of sampling.
  """
  logits = logits_BxV.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  logits = logits / jnp.where(temperature > 0, temperature, 1.0)

  def truncate(logits):
    vocab = logits.shape[-1]
    order_BxV = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order_BxV, axis=-1)
    ranks = jnp.arange(vocab)
    keep_sorted = ranks < jnp.where(top_k > 0, top_k, vocab)
    sorted_probs = jax.nn.softmax(jnp.where(keep_sorted, sorted_logits, _EXCLUDED_LOGIT), -1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted &= (mass_before < top_p) | (ranks == 0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order_BxV].set(
        keep_sorted)
    return jnp.where(keep, logits, _EXCLUDED_LOGIT)

  active = (top_k > 0) | (top_p < 1.0)
  return jax.lax.cond(active, truncate, lambda x: x, logits)


def choose_tokens(logits_BxV: jax.Array, rng: jax.Array, *, temperature, top_k, top_p):
  """Picks one token per row; returns (tokens, model log-probs, sampling log-probs)."""
  filtered = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  sampled = jax.random.categorical(rng, filtered, axis=-1)
  greedy = jnp.argmax(logits_BxV, axis=-1)
  is_greedy = jnp.asarray(temperature) <= 0
  tokens_B = jnp.where(is_greedy, greedy, sampled).astype(jnp.int32)

  model_logprobs = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  sampling_logprobs = jax.nn.log_softmax(filtered, axis=-1)
  pick = lambda table: jnp.take_along_axis(table, tokens_B[:, None], axis=-1)[:, 0]
  sampling_lp = jnp.where(is_greedy, 0.0, pick(sampling_logprobs))
  return tokens_B, pick(model_logprobs), sampling_lp


def _check_settings(temperature, top_k, top_p) -> None:
  """Validates sampling settings given as Python numbers (traced values are not checked)."""
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
  if isinstance(top_k, int) and top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}.")


def prefill(model: Llama, params, prompt_tokens_BxP, prompt_mask_BxP, cache: KVCache,
            chunk_size: int | None = None):
  """Feeds the prompt into the cache in chunks; returns (last-position logits [B, V], cache)."""
  length = prompt_tokens_BxP.shape[1]
  chunk_size = chunk_size or length
  logits = None
  for start in range(0, length, chunk_size):
    stop = min(start + chunk_size, length)
    logits, cache = model.apply(params, prompt_tokens_BxP[:, start:stop],
                                prompt_mask_BxP[:, start:stop], cache=cache,
                                last_position_only=True)
  return logits[:, -1], cache


def sample(model: Llama, params, prompt_tokens_BxP: jax.Array, prompt_mask_BxP: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
           eos_id: int = 2, pad_id: int = 0,
           prefill_chunk_size: int | None = None) -> SampleOutput:
  """Samples continuations of left-padded prompts.

  Args:
    model: a `Llama` with the "lm" head.
    params: its parameters.
    prompt_tokens_BxP: prompts, left-padded (padding first, so prompts end at column P - 1).
    prompt_mask_BxP: 1 on real prompt tokens. Every row needs at least one.
    rng: PRNG key; step t uses `fold_in(rng, t)`.
    max_new_tokens: the length limit T of every row.
    temperature: 0 means greedy (argmax, no division by zero).
    top_k: keep the k most likely tokens; 0 disables.
    top_p: nucleus sampling threshold in (0, 1]; 1 disables.
    eos_id: a row stops after generating this token.
    pad_id: written after a row stops.
    prefill_chunk_size: feed the prompt this many tokens at a time (None: all at once).

  Returns:
    A `SampleOutput`; see its docstring for the distributions of the two log-probabilities.
  """
  if model.head != "lm":
    raise ValueError(f"sample needs a model with the 'lm' head, got {model.head!r}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  _check_settings(temperature, top_k, top_p)
  # Fixed dtypes for the traced settings, so every call with the same shapes hits one program.
  settings = (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
              jnp.asarray(top_p, jnp.float32))
  return _sample_jit(model, params, prompt_tokens_BxP, prompt_mask_BxP, rng, settings,
                     max_new_tokens, eos_id, pad_id, prefill_chunk_size)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _sample_jit(model, params, prompt_tokens_BxP, prompt_mask_BxP, rng, settings,
                max_new_tokens, eos_id, pad_id, prefill_chunk_size):
  temperature, top_k, top_p = settings
  batch, prompt_length = prompt_tokens_BxP.shape
  cache = init_cache(model.config, batch, prompt_length + max_new_tokens)
  logits_BxV, cache = prefill(model, params, prompt_tokens_BxP, prompt_mask_BxP, cache,
                              prefill_chunk_size)

  def keep_going(state):
    step, _, _, done_B, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def generate_one(state):
    step, cache, logits_BxV, done_B, outputs = state
    tokens_B, logprobs_B, sampling_lp_B = choose_tokens(
        logits_BxV, jax.random.fold_in(rng, step), temperature=temperature, top_k=top_k,
        top_p=top_p)
    active_B = ~done_B
    tokens_B = jnp.where(active_B, tokens_B, pad_id)
    columns = (tokens_B, active_B.astype(jnp.int32), jnp.where(active_B, logprobs_B, 0.0),
               jnp.where(active_B, sampling_lp_B, 0.0))
    outputs = tuple(out.at[:, step].set(col) for out, col in zip(outputs, columns))
    done_B = done_B | (tokens_B == eos_id)
    # Stopped rows feed padding that the cache marks as not real, so they stay unchanged.
    logits_Bx1xV, cache = model.apply(params, tokens_B[:, None], active_B[:, None], cache=cache)
    return step + 1, cache, logits_Bx1xV[:, 0], done_B, outputs

  outputs = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.float32),
             jnp.zeros((batch, max_new_tokens), jnp.float32))
  state = (jnp.zeros((), jnp.int32), cache, logits_BxV, jnp.zeros((batch,), bool), outputs)
  _, _, _, _, outputs = jax.lax.while_loop(keep_going, generate_one, state)
  tokens, mask, logprobs, sampling_logprobs = outputs
  return SampleOutput(tokens, mask, logprobs, sampling_logprobs, jnp.sum(mask, axis=1))
