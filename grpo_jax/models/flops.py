"""Model FLOPs of a GRPO step, peak FLOP/s per accelerator, MFU. Pure arithmetic: no arrays, no devices.

Counts are the model's useful work, 2 FLOPs per multiply-add, as in the PaLM appendix B / Chinchilla
convention (6 N T for a training token, plus attention). A forward pass of B sequences, each running T new
tokens after C tokens already in the KV cache:

    F(B, T, C) = B * (2 * N_mm * T + 4 * L * n * h * K(C, T))

    N_mm    = L * (2*d*n*h + 2*d*k*h + 3*d*f) + d*V   weights every token multiplies: q and o, k and v, the gated
                                                      MLP's gate / up / down, the LM head (tied or not). The
                                                      embedding lookup is a gather (free); norms, biases, RoPE
                                                      and softmax are left out (< 1% at any useful size).
    K(C, T) = sum_{i=1..T} min(C + i, W)              keys the new tokens attend to: causal, each sees itself,
                                                      W = sliding window (unbounded when 0).
    4       = 2 (multiply-add) x 2 (q.k scores, then probs.v)

One GRPO step with P prompts, G completions each (N = P*G rows), prompt length p (left-padded), completion
width c, c' <= c decode steps actually run (the loop stops once every row has emitted EOS), mu epochs:

    prefill   = F(P, p, 0)            once per prompt: the group's G samples share its KV cache
    decode    = F(N, c', p)           one token per row per step against the cache
    reference = F(N, p + c, 0)        frozen reference forward, only when beta > 0
    policy    = 3 * mu * F(N, p + c, 0)   forward + backward (= 2 x forward); minibatches split N, so the
                                          total does not depend on their number

With the shared-prompt forward (rl.shared_prompt) the reference and policy passes run each prompt once and the
completions against its keys, as the sampler does: F(N, p + c, 0) becomes F(P, p, 0) + F(N, c, p). The batch's
completion width c is its length bucket (rollout/trim.py), not the budget. Packed (rl.pack_buckets), the N
completion rows are P * R rows of width c: F(P, p, 0) + F(P * R, c, p).

The sampler's decode attends over every cache slot (masked), so the hardware does more attention work than
K counts; MFU by convention credits only the model's work.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from grpo_jax.models.transformer import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """N_mm: the weights that multiply every token (embedding lookup excluded, LM head included)."""
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return cfg.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * cfg.vocab_size


def attended_keys(cached: int, new: int, window: int = 0) -> int:
  """K(C, T) = sum_{i=1..T} min(C + i, W): keys seen by T new causal tokens after C cached ones (W=0: no cap)."""
  first, last = cached + 1, cached + new
  if not window or last <= window:
    return (first + last) * new // 2
  if first > window:
    return new * window
  return (first + window) * (window - first + 1) // 2 + (last - window) * window


def forward_flops(cfg: ModelConfig, *, batch: int, new_tokens: int, cached: int = 0) -> float:
  """F(B, T, C): forward FLOPs of `batch` sequences each running `new_tokens` after `cached` cached tokens."""
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended_keys(cached, new_tokens,
                                                                                 cfg.sliding_window)
  return float(batch) * (2 * matmul_params(cfg) * new_tokens + attention)


def grpo_step_flops(cfg: ModelConfig, *, num_prompts: int, group_size: int, prompt_len: int, completion_len: int,
                    decode_len: int | None = None, reference: bool, num_epochs: int = 1,
                    shared_prompt: bool = False, packed_rows: int = 0) -> dict[str, float]:
  """Model FLOPs of one GRPO step by phase (see the module docstring), and their 'total'.

  decode_len: decode steps run (default completion_len, the worst case); reference: beta > 0; shared_prompt: the
  reference and policy passes run each prompt once for its group; packed_rows = R > 0 (with shared_prompt): their
  completions run as R rows per group (core/packing.py).
  """
  rows, total_len = num_prompts * group_size, prompt_len + completion_len
  if shared_prompt:
    trained_rows = num_prompts * packed_rows if packed_rows else rows
    full = (forward_flops(cfg, batch=num_prompts, new_tokens=prompt_len)
            + forward_flops(cfg, batch=trained_rows, new_tokens=completion_len, cached=prompt_len))
  else:
    full = forward_flops(cfg, batch=rows, new_tokens=total_len)
  phases = {
      'prefill': forward_flops(cfg, batch=num_prompts, new_tokens=prompt_len),
      'decode': forward_flops(cfg, batch=rows, new_tokens=completion_len if decode_len is None else decode_len,
                              cached=prompt_len),
      'reference_forward': full if reference else 0.0,
      'policy_forward_backward': 3.0 * num_epochs * full,
  }
  phases['total'] = sum(phases.values())
  return phases


def grpo_step_work(cfg: ModelConfig, prompt_mask: np.ndarray, completion_mask: np.ndarray, *, group_size: int,
                   reference: bool, num_epochs: int, shared_prompt: bool = False, packed_rows: int = 0
                   ) -> dict[str, float]:
  """The logged work of one GRPO step from its rollout's masks (prompt_mask [N, p], completion_mask [N, c]).

  model_flops: grpo_step_flops on the rollout's shapes, with the decode steps the sampler ran (its longest row:
  the loop stops once every row is done). step_tokens: real prompt + completion tokens (no padding), the
  tokens the policy trains on (veRL's throughput convention).
  """
  rows, prompt_len = prompt_mask.shape
  flops = grpo_step_flops(cfg, num_prompts=rows // group_size, group_size=group_size, prompt_len=prompt_len,
                          completion_len=completion_mask.shape[1], decode_len=int(completion_mask.sum(-1).max()),
                          reference=reference, num_epochs=num_epochs, shared_prompt=shared_prompt,
                          packed_rows=packed_rows)
  return {'model_flops': flops['total'], 'step_tokens': float(prompt_mask.sum() + completion_mask.sum())}


class DeviceSpec(NamedTuple):
  """Per JAX device (one chip on TPU v4 and later, one GPU); dense FLOP/s, no sparsity."""
  bf16: float  # peak FLOP/s of bf16 matmuls
  fp32: float | None  # of f32 matmuls at XLA's DEFAULT precision; None: not published
  hbm_gib: float  # on-package memory (NVIDIA's "80 GB" / "141 GB" are within 1% of GiB as nvidia-smi counts)
  hbm_bytes_per_s: float  # peak HBM bandwidth: the roofline of memory-bound work such as decoding


# device_kind as jax.devices()[0].device_kind reports it (lower case, full match) -> spec. Sources:
#   TPU: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (per-chip bf16 peak, HBM size and bandwidth);
#   device_kind strings and HBM sizes as in XLA's ifrt GetDeviceMemoryInBytes. At DEFAULT precision XLA runs
#   f32 matmuls on the TPU MXU as one bf16 pass (jax-ml/jax#1856), so their peak is the bf16 peak.
#   GPU: NVIDIA H100 / H200 / A100 datasheets (dense, i.e. half the "with sparsity" figures). At DEFAULT
#   precision XLA runs f32 matmuls in TF32 on Ampere and later, so fp32 is the TF32 tensor-core peak.
#   CPU and anything else: unknown (None), so no MFU is reported.
DEVICE_SPECS: tuple[tuple[str, str, DeviceSpec], ...] = (
    ('TPU v4', r'tpu v4', DeviceSpec(275e12, 275e12, 32, 1228e9)),
    ('TPU v5e', r'tpu v5 ?lite|tpu v5e', DeviceSpec(197e12, 197e12, 16, 819e9)),
    ('TPU v5p', r'tpu v5p?', DeviceSpec(459e12, 459e12, 95, 2765e9)),
    ('TPU v6e', r'tpu v6 ?lite|tpu v6e', DeviceSpec(918e12, 918e12, 32, 1640e9)),
    ('H100 PCIe', r'(nvidia )?h100 pcie', DeviceSpec(756e12, 378e12, 80, 2.0e12)),
    ('H100 SXM', r'(nvidia )?h100( 80gb hbm3| sxm\S*)?', DeviceSpec(989.4e12, 494.7e12, 80, 3.35e12)),
    ('H200', r'(nvidia )?h200( sxm\S*)?', DeviceSpec(989.4e12, 494.7e12, 141, 4.8e12)),
    ('A100 80GB', r'(nvidia )?a100.*80gb.*', DeviceSpec(312e12, 156e12, 80, 2.039e12)),
    ('A100 40GB', r'(nvidia )?a100(.*40gb.*)?', DeviceSpec(312e12, 156e12, 40, 1.555e12)),
)


def device_spec(device_kind: str) -> tuple[str, DeviceSpec] | None:
  """(table name, spec) for a device_kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3', or 'v5p', 'H100'), or None."""
  kind = ' '.join(device_kind.lower().split())
  spellings = (kind, f'tpu {kind}')  # 'v5p' is short for 'tpu v5p'
  for name, pattern, spec in DEVICE_SPECS:
    if any(re.fullmatch(pattern, s) for s in spellings):
      return name, spec
  return None


def peak_flops(device_kind: str, dtype) -> float | None:
  """Peak matmul FLOP/s of one device for the compute dtype ('bfloat16' / 'float32'), or None if unknown."""
  found = device_spec(device_kind)
  column = {'bfloat16': 'bf16', 'float32': 'fp32'}.get(jnp.dtype(dtype).name)
  return getattr(found[1], column) if found and column else None


def mfu(flops: float, seconds: float, num_devices: int, device_kind: str, dtype='bfloat16') -> float | None:
  """Model FLOPs utilization: flops / (seconds * num_devices * peak); None when the peak is unknown."""
  peak = peak_flops(device_kind, dtype)
  if peak is None or seconds <= 0:
    return None
  return flops / (seconds * num_devices * peak)


def throughput(work: dict[str, float], seconds: float, *, num_devices: int, device_kind: str,
               dtype) -> dict[str, float]:
  """Rates of a step's work (grpo_step_work) over its wall time: tokens/s per device, and MFU when known."""
  out = {'tokens_per_s_per_device': work['step_tokens'] / max(seconds, 1e-9) / num_devices}
  utilization = mfu(work['model_flops'], seconds, num_devices, device_kind, dtype)
  if utilization is not None:
    out['mfu'] = utilization
  return out
