"""BLEU of one sample against references, and Self-BLEU, the diversity measure built on it.

BLEU (Papineni et al., 2002) is the geometric mean of the modified n-gram precisions p_1..p_N
times a brevity penalty:

  BLEU = BP * exp(sum_n w_n * log p_n),  w_n = 1 / N (uniform weights, N = 4 by default),
  p_n = sum over n-grams g of min(count_hyp(g), max_r count_r(g)) / number of n-grams of hyp,
  BP = 1 if c > r else exp(1 - r / c),

where c is the hypothesis length and r the reference length closest to c (the shorter one on a
tie). Clipping by the largest count in any single reference stops a hypothesis from scoring by
repeating a reference word.

Self-BLEU (Zhu et al., 2018, "Texygen") scores each generated sample against all the other
samples as references and averages the scores: 1 means every sample repeats the others, lower
means more diverse samples. Touvron et al. (2023) plot it against the sampling temperature to
show that RLHF lowers diversity on factual prompts more than on creative ones.

A sample is either a string, split on whitespace, or a sequence of token ids (or other hashable
tokens). Strip padding and end-of-sequence tokens before passing token ids.
"""

from __future__ import annotations

import collections
import math
from typing import Hashable, Mapping, Sequence

import numpy as np

Sample = str | Sequence[Hashable] | np.ndarray

# Smoothing of zero n-gram precisions, which would otherwise make the BLEU of a short sample 0:
#   "add_one": p_n = (matches + 1) / (n-grams + 1) for n >= 2, and no smoothing for n = 1
#     (Lin and Och, 2004, "ORANGE", known as BLEU+1). Identical samples still give 1 and samples
#     that share no token still give 0.
#   "epsilon": a zero match count is replaced by 0.1, and an order with no n-gram in the sample
#     counts as one n-gram (modelled on method 1 of NLTK's SmoothingFunction, which Texygen's
#     Self-BLEU uses; not checked against NLTK here). Samples that share no token then give a
#     small positive score, not 0.
#   "none": unsmoothed BLEU; any zero precision, or a sample shorter than N tokens, gives 0.
SMOOTHING_METHODS = ("add_one", "epsilon", "none")

_EPSILON = 0.1


def tokenize(sample: Sample) -> tuple[Hashable, ...]:
  """Splits a string on whitespace, or converts a sequence of token ids to a tuple."""
  if isinstance(sample, str):
    return tuple(sample.split())
  if isinstance(sample, np.ndarray):
    if sample.ndim != 1:
      raise ValueError(f"A token-id sample must be 1-D, got shape {sample.shape}.")
    return tuple(sample.tolist())
  return tuple(sample)


def sentence_bleu(
    hypothesis: Sample,
    references: Sequence[Sample],
    *,
    max_order: int = 4,
    smoothing: str = "add_one",
) -> float:
  """Computes the BLEU of one hypothesis against one or more references.

  Args:
    hypothesis: the sample to score.
    references: samples to compare against, at least one.
    max_order: N, the longest n-gram; the weights are 1 / N each.
    smoothing: one of `SMOOTHING_METHODS`.

  Returns:
    BLEU in [0, 1]. An empty hypothesis gives 0.

  Raises:
    ValueError: on no references, max_order < 1 or an unknown smoothing method.
  """
  _check_arguments(max_order, smoothing)
  if not references:
    raise ValueError("sentence_bleu needs at least one reference, got none.")
  hypothesis_tokens = tokenize(hypothesis)
  reference_tokens = [tokenize(reference) for reference in references]
  return _bleu(
      _ngram_counts(hypothesis_tokens, max_order),
      len(hypothesis_tokens),
      _max_reference_counts([_ngram_counts(tokens, max_order) for tokens in reference_tokens]),
      [len(tokens) for tokens in reference_tokens],
      max_order=max_order,
      smoothing=smoothing)


def self_bleu(
    samples: Sequence[Sample], *, max_order: int = 4, smoothing: str = "add_one") -> float:
  """Computes the Self-BLEU of a set of samples: the mean BLEU of each against all the others.

  The cost grows with the square of the number of samples; Texygen scores a random subset when
  there are many, which a caller can do by passing one.

  Args:
    samples: at least two generations, e.g. several answers to the same prompts.
    max_order: N, the longest n-gram.
    smoothing: one of `SMOOTHING_METHODS`.

  Returns:
    Self-BLEU in [0, 1]: 1 when all samples are identical, lower for more diverse samples.

  Raises:
    ValueError: on fewer than two samples or invalid BLEU arguments.
  """
  _check_arguments(max_order, smoothing)
  if len(samples) < 2:
    raise ValueError(f"self_bleu needs at least two samples, got {len(samples)}.")
  tokens = [tokenize(sample) for sample in samples]
  counts = [_ngram_counts(sample_tokens, max_order) for sample_tokens in tokens]
  lengths = [len(sample_tokens) for sample_tokens in tokens]

  scores = []
  for i in range(len(samples)):
    others = [j for j in range(len(samples)) if j != i]
    scores.append(_bleu(
        counts[i], lengths[i],
        _max_reference_counts([counts[j] for j in others]),
        [lengths[j] for j in others],
        max_order=max_order,
        smoothing=smoothing))
  return float(np.mean(scores))


def self_bleu_by_temperature(
    samples_by_temperature: Mapping[float, Sequence[Sample]],
    *,
    max_order: int = 4,
    smoothing: str = "add_one",
) -> dict[float, float]:
  """Computes the Self-BLEU of the samples drawn at each temperature.

  Args:
    samples_by_temperature: sampling temperature -> at least two samples drawn at it.
    max_order: N, the longest n-gram.
    smoothing: one of `SMOOTHING_METHODS`.

  Returns:
    temperature -> Self-BLEU, in increasing order of temperature.
  """
  return {
      float(temperature): self_bleu(
          samples_by_temperature[temperature], max_order=max_order, smoothing=smoothing)
      for temperature in sorted(samples_by_temperature)
  }


def _check_arguments(max_order: int, smoothing: str) -> None:
  if max_order < 1:
    raise ValueError(f"max_order must be at least 1, got {max_order}.")
  if smoothing not in SMOOTHING_METHODS:
    raise ValueError(
        f"Invalid smoothing {smoothing!r}. Expected one of {list(SMOOTHING_METHODS)}.")


def _ngram_counts(tokens: tuple[Hashable, ...], max_order: int) -> collections.Counter:
  """Counts every n-gram of `tokens` for n in [1, max_order], keyed by the n-gram tuple."""
  counts = collections.Counter()
  for n in range(1, max_order + 1):
    for start in range(len(tokens) - n + 1):
      counts[tokens[start:start + n]] += 1
  return counts


def _max_reference_counts(reference_counts: Sequence[collections.Counter]) -> dict:
  """Returns the largest count of each n-gram in any single reference (the clipping limit)."""
  limits = {}
  for counts in reference_counts:
    for ngram, count in counts.items():
      if count > limits.get(ngram, 0):
        limits[ngram] = count
  return limits


def _bleu(hypothesis_counts, hypothesis_length, reference_limits, reference_lengths, *,
          max_order, smoothing) -> float:
  if hypothesis_length == 0:
    return 0.0

  matches = [0] * max_order
  totals = [max(hypothesis_length - n, 0) for n in range(max_order)]
  for ngram, count in hypothesis_counts.items():
    matches[len(ngram) - 1] += min(count, reference_limits.get(ngram, 0))

  log_precision_sum = 0.0
  for n in range(max_order):
    if smoothing == "add_one" and n > 0:
      numerator, denominator = matches[n] + 1, totals[n] + 1
    elif smoothing == "epsilon":
      numerator, denominator = matches[n] or _EPSILON, max(totals[n], 1)
    else:
      numerator, denominator = matches[n], totals[n]
    if numerator == 0 or denominator == 0:
      return 0.0
    log_precision_sum += math.log(numerator / denominator) / max_order

  # Closest reference length, the shorter one on a tie.
  closest = min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))
  if hypothesis_length > closest:
    brevity_penalty = 1.0
  else:
    brevity_penalty = math.exp(1.0 - closest / hypothesis_length)
  return brevity_penalty * math.exp(log_precision_sum)
