"""Pure train steps, one module per algorithm: `(state, batch, rng) -> (new_state, metrics)`.

Hyper-parameters are bound with `functools.partial` before `jax.jit`; `sharding.jit_sharded_step`
adds the mesh shardings and donates the state.
"""

from llama2_jax.steps.ppo import PPOState, ppo_step, response_logprobs, response_values
from llama2_jax.steps.reward import reward_scores, reward_step
from llama2_jax.steps.sft import sft_step
