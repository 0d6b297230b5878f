"""Evaluation of the helpfulness/safety trade-off, as pure host-side functions.

  * Reward models: accuracy on held-out preference pairs, overall and per annotator rating
    (`reward_model_accuracy`).
  * Policies compared by reward: win rate of A over B with a confidence interval (`win_rate`),
    and the fraction of responses the safety reward model scores as unsafe
    (`safety_violation_proxy`, a stand-in for Llama 2's human safety ratings).
  * Diversity: BLEU and Self-BLEU (`sentence_bleu`, `self_bleu`, `self_bleu_by_temperature`).
  * Refusals: a string-matching refusal heuristic and the false-refusal rate on XSTest's safe
    prompts (`is_refusal`, `count_refusals`).
  * Best-of-K reward against K is `losses.reward_by_num_samples`.

Each result is a frozen dataclass whose `metrics(prefix)` returns floats under `eval/...` keys
for `metrics_log.MetricsWriter`; a rate without a denominator is None and is left out of the
metrics.
"""

from llama2_jax.evaluation_bleu import (
    SMOOTHING_METHODS,
    self_bleu,
    self_bleu_by_temperature,
    sentence_bleu,
    tokenize,
)
from llama2_jax.evaluation_refusal import (
    MATCH_MODES,
    REFUSAL_PHRASES,
    RefusalCounts,
    count_refusals,
    is_refusal,
    normalize_response,
)
from llama2_jax.evaluation_reward import (
    RATING_NAMES,
    WIN_RATE_INTERVALS,
    RewardAccuracy,
    SafetyViolations,
    WinRate,
    reward_model_accuracy,
    safety_violation_proxy,
    wilson_interval,
    win_rate,
)
from llama2_jax.losses.rejection_sampling import RewardByK, reward_by_num_samples
