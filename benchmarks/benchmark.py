"""Measures training, scoring and decoding throughput; prints one JSON object per measurement.

Usage:
  python benchmarks/benchmark.py                     # tiny and small presets, batch 8 x 256
  python benchmarks/benchmark.py --presets small --batch_size 8 --seq_len 256 --repeats 5

Each record names the preset, the measurement, tokens per second, model FLOPs per token
(`ModelConfig.flops_per_token`: forward only for scoring and decoding, 3x forward for training)
and the fraction of this machine's measured matmul peak (`matmul_peak` record, a float32 square
matmul) that the achieved FLOP rate reaches. Times exclude compilation: every function runs once
before it is timed. This script records numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama2_jax import get_model_config
from llama2_jax.model import Llama, init_params
from llama2_jax.sampling import sample


def _best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def measure_matmul_peak(size: int, repeats: int, dtype=jnp.float32) -> float:
  """Returns the best FLOP/s of a square matmul of the given size."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2.0 * size**3 / _best_time(lambda: matmul(a, b), repeats)


def _train_step_fn(model: Llama, optimizer):
  def loss_fn(params, tokens_BxL):
    logits = model.apply(params, tokens_BxL[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:])
    return jnp.mean(losses)

  def step(params, opt_state, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxL)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _record(**fields) -> None:
  print(json.dumps(fields), flush=True)


def benchmark_preset(preset: str, args, peak: float) -> None:
  config = get_model_config(preset, dtype=args.dtype, param_dtype=args.param_dtype)
  model = Llama(config)
  params = init_params(model, jax.random.key(0))
  batch, length = args.batch_size, args.seq_len
  tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 3, config.vocab_size)
  forward_flops = config.flops_per_token(length)
  common = dict(preset=preset, dtype=args.dtype, params=config.num_params(), backend=jax.default_backend())

  optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)
  state = {"params": params, "opt_state": optimizer.init(params)}
  train = _train_step_fn(model, optimizer)

  def run_train():
    state["params"], state["opt_state"], loss = train(state["params"], state["opt_state"], tokens)
    return loss

  seconds = _best_time(run_train, args.repeats)
  rate = batch * length / seconds
  _record(measurement="train_step", batch=batch, seq_len=length, tokens_per_s=rate,
          flops_per_token=3 * forward_flops, fraction_of_peak=3 * forward_flops * rate / peak,
          **common)

  forward = jax.jit(model.apply)
  seconds = _best_time(lambda: forward(state["params"], tokens[:, :-1]), args.repeats)
  rate = batch * length / seconds
  _record(measurement="forward", batch=batch, seq_len=length, tokens_per_s=rate,
          flops_per_token=forward_flops, fraction_of_peak=forward_flops * rate / peak, **common)

  for decode_batch in (1, 8):
    prompt = tokens[:decode_batch, :args.prompt_len]
    mask = jnp.ones_like(prompt)
    new = args.decode_tokens

    def run_decode():
      return sample(model, state["params"], prompt, mask, jax.random.key(2), max_new_tokens=new,
                    temperature=1.0, eos_id=-1).tokens_BxT

    seconds = _best_time(run_decode, max(args.repeats, 5))
    rate = decode_batch * new / seconds
    # Average context over the decode, for the attention term.
    decode_flops = config.flops_per_token(args.prompt_len + new // 2)
    _record(measurement="decode", batch=decode_batch, prompt_len=args.prompt_len,
            new_tokens=new, tokens_per_s=rate, flops_per_token=decode_flops,
            fraction_of_peak=decode_flops * rate / peak, **common)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="tiny,small", help="comma-separated model presets")
  parser.add_argument("--batch_size", type=int, default=8, help="rows per training batch")
  parser.add_argument("--seq_len", type=int, default=256, help="tokens per training row")
  parser.add_argument("--prompt_len", type=int, default=16, help="prompt tokens when decoding")
  parser.add_argument("--decode_tokens", type=int, default=128, help="new tokens per row")
  parser.add_argument("--dtype", default="float32", help="compute dtype")
  parser.add_argument("--param_dtype", default="float32", help="parameter dtype")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
  parser.add_argument("--matmul_size", type=int, default=2048, help="side of the peak matmul")
  args = parser.parse_args()

  peak = measure_matmul_peak(args.matmul_size, args.repeats)
  _record(measurement="matmul_peak", size=args.matmul_size, flops_per_s=peak,
          backend=jax.default_backend(), devices=len(jax.devices()))
  for preset in args.presets.split(","):
    benchmark_preset(preset.strip(), args, peak)


if __name__ == "__main__":
  main()
