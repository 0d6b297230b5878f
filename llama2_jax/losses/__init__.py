"""Objectives of the Llama 2-Chat pipeline as pure functions of arrays.

Each loss takes keyword-only arrays with shape-suffixed names, computes in float32 and returns
`(loss, metrics)`, where the metrics are sums with their denominators under a namespaced key
(`sft/`, `reward/`, `ppo/`, `rs/`).
"""

from llama2_jax.losses.ppo import (
    KL_ESTIMATORS,
    discounted_returns,
    gae_advantages,
    kl_penalized_rewards,
    masked_entropy,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
)
from llama2_jax.losses.rejection_sampling import (
    BestOfK,
    RewardByK,
    SamplePool,
    reward_by_num_samples,
    select_best_of_k,
    update_pool,
)
from llama2_jax.losses.reward import (
    MARGIN_PRESETS,
    Rating,
    RewardStatistics,
    combine_safety_and_helpfulness_rewards,
    ranking_loss,
    rating_margins,
)
from llama2_jax.losses.sft import sft_loss, token_logprobs
