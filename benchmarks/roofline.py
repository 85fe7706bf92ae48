"""FLOP counts of one GRPO step's phases for a dense decoder, and this machine's practical matmul peak.

Counts are the model's useful work (2 FLOPs per multiply-add): matmuls against the weights plus the
attention score and value products over the causal context. Backward = 2x forward.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from grpo_jax.model import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that multiply every token (embedding lookups are free, the LM head is not)."""
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f  # q and o, k and v, SwiGLU gate/up/down
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def forward_flops(cfg: ModelConfig, num_tokens: int, mean_context: float) -> float:
  """Forward FLOPs for num_tokens tokens that each attend to mean_context keys."""
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_context  # q.k and p.v per token
  return num_tokens * (2 * matmul_params(cfg) + attention)


def grpo_step_flops(cfg: ModelConfig, *, num_sequences: int, prompt_len: int, completion_len: int,
                    reference: bool) -> dict[str, float]:
  total_len = prompt_len + completion_len
  full = forward_flops(cfg, num_sequences * total_len, (total_len + 1) / 2)  # causal: mean context ~ t/2
  phases = {
      'prefill': forward_flops(cfg, num_sequences * prompt_len, (prompt_len + 1) / 2),
      'decode': forward_flops(cfg, num_sequences * completion_len, prompt_len + (completion_len + 1) / 2),
      'reference_forward': full if reference else 0.0,
      'policy_forward_backward': 3 * full,
  }
  phases['total'] = sum(phases.values())
  return phases


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
