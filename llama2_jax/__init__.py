"""llama2_jax: the Llama 2-Chat alignment pipeline in JAX and Flax."""

from llama2_jax.config import ModelConfig, PRESETS, get_model_config
