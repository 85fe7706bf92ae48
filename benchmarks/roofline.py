"""This machine's practical matmul peak. FLOP counts of a GRPO step's phases are in grpo_jax/models/flops.py."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best observed FLOP/s of an n x n fp32 matmul: this machine's practical peak."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best
