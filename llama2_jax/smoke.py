"""Checks an installation: builds the tiny model, runs a forward pass and samples a few tokens.

Run with `python -m llama2_jax.smoke`. The weights are random, so the tokens are meaningless; the
point is that JAX, Flax and the sampler work on this machine.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax import get_model_config
from llama2_jax.model import Llama, init_params
from llama2_jax.sampling import sample


def main() -> None:
  config = get_model_config("tiny")
  model = Llama(config)
  params = init_params(model, jax.random.key(0))
  prompts = jnp.array([[0, 0, 1, 50, 60], [1, 70, 80, 90, 100]], jnp.int32)
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)

  logits = model.apply(params, prompts, mask)
  out = sample(model, params, prompts, mask, jax.random.key(1), max_new_tokens=16,
               temperature=0.8, top_p=0.95)

  print(f"devices: {jax.devices()}")
  print(f"model: tiny preset, {config.num_params():,} parameters")
  print(f"logits finite: {bool(np.isfinite(np.asarray(logits)).all())}")
  print(f"sampled tokens:\n{np.asarray(out.tokens_BxT)}")


if __name__ == "__main__":
  main()
