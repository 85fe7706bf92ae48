"""grpo_jax.models.flops against hand-worked counts for a tiny model, the device table, MFU and the logged rates."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models import flops
from grpo_jax.models.transformer import ModelConfig, Transformer

# d 4, 1 layer, 2 query heads and 1 kv head of dim 2, mlp 8, vocab 10.
TINY = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2, mlp_dim=8)


def test_matmul_params_by_hand():
  # q, o: 2 * 4*2*2 = 32; k, v: 2 * 4*1*2 = 16; gate / up / down: 3 * 4*8 = 96; LM head 4*10 = 40.
  assert flops.matmul_params(TINY) == 32 + 16 + 96 + 40 == 184


@pytest.mark.parametrize('tie', [False, True])
def test_matmul_params_are_the_model_weights_but_embedding_and_norms(tie):
  cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=24,
                    tie_embeddings=tie)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  norms = (2 * cfg.num_layers + 1) * cfg.d_model
  head_is_embedding = cfg.vocab_size * cfg.d_model if tie else 0  # tied: the head matmul reuses the embedding
  assert flops.matmul_params(cfg) == total - cfg.vocab_size * cfg.d_model - norms + head_is_embedding


def test_attended_keys():
  assert flops.attended_keys(0, 3) == 1 + 2 + 3
  assert flops.attended_keys(3, 2) == 4 + 5
  assert flops.attended_keys(3, 2, window=4) == 4 + 4
  assert flops.attended_keys(0, 6, window=4) == 1 + 2 + 3 + 4 + 4 + 4
  assert flops.attended_keys(5, 3, window=4) == 3 * 4
  for cached, new, window in [(0, 7, 3), (2, 9, 5), (6, 4, 20), (0, 1, 1)]:
    assert flops.attended_keys(cached, new, window) == sum(min(cached + i, window) for i in range(1, new + 1))


def test_forward_flops_by_hand():
  # 1 sequence of 3 tokens: matmuls 2 * 184 * 3 = 1104; attention 4 * 1 layer * 2 heads * 2 dims * (1+2+3) = 96.
  assert flops.forward_flops(TINY, batch=1, new_tokens=3) == 1200
  # 2 rows decoding 2 tokens after 3 cached: per row 2 * 184 * 2 + 16 * (4 + 5) = 880.
  assert flops.forward_flops(TINY, batch=2, new_tokens=2, cached=3) == 1760


def test_grpo_step_flops_by_hand():
  # P=2 prompts, G=3, p=3, c=2, 1 decode step run, reference on, 2 epochs.
  out = flops.grpo_step_flops(TINY, num_prompts=2, group_size=3, prompt_len=3, completion_len=2, decode_len=1,
                              reference=True, num_epochs=2)
  prefill = 2 * 1200  # once per prompt, not per sample
  decode = 6 * (2 * 184 + 16 * 4)  # 6 rows, 1 token seeing 4 keys
  full = 6 * (2 * 184 * 5 + 16 * 15)  # 6 rows of 5 tokens, causal: 1+...+5 keys
  assert out == {'prefill': prefill, 'decode': decode, 'reference_forward': full,
                 'policy_forward_backward': 3 * 2 * full, 'total': prefill + decode + full + 6 * full}
  assert out['total'] == 92352
  no_ref = flops.grpo_step_flops(TINY, num_prompts=2, group_size=3, prompt_len=3, completion_len=2,
                                 reference=False)
  assert no_ref['reference_forward'] == 0 and no_ref['decode'] == 6 * (2 * 184 * 2 + 16 * 9)


def test_shared_prompt_flops_by_hand():
  # As above, the reference and policy passes with each prompt run once: 2 prompts of 3 tokens (the prefill's
  # 1200 each), then 6 rows of 2 completion tokens after 3 cached keys (4 + 5 keys each).
  out = flops.grpo_step_flops(TINY, num_prompts=2, group_size=3, prompt_len=3, completion_len=2, decode_len=1,
                              reference=True, num_epochs=2, shared_prompt=True)
  full = 2 * 1200 + 6 * (2 * 184 * 2 + 16 * (4 + 5))
  assert out['reference_forward'] == full and out['policy_forward_backward'] == 3 * 2 * full
  repeated = flops.grpo_step_flops(TINY, num_prompts=2, group_size=3, prompt_len=3, completion_len=2, decode_len=1,
                                   reference=True, num_epochs=2)
  assert out['prefill'] == repeated['prefill'] and out['decode'] == repeated['decode']
  assert out['total'] < repeated['total']
  # Packed into R = 2 rows per group (core/packing.py): 4 completion rows instead of 6, the rest as before.
  packed = flops.grpo_step_flops(TINY, num_prompts=2, group_size=3, prompt_len=3, completion_len=2, decode_len=1,
                                 reference=True, num_epochs=2, shared_prompt=True, packed_rows=2)
  assert packed['reference_forward'] == 2 * 1200 + 4 * (2 * 184 * 2 + 16 * (4 + 5))
  assert packed['decode'] == out['decode'] and packed['prefill'] == out['prefill']


def test_grpo_step_work_from_masks():
  prompt_mask = np.array([[0, 1, 1]] * 3 + [[1, 1, 1]] * 3)  # [6, 3]: 2 + 3 real tokens per group row
  completion_mask = np.array([[1, 0]] * 5 + [[0, 0]])  # longest row: 1 token, so one decode step ran
  work = flops.grpo_step_work(TINY, prompt_mask, completion_mask, group_size=3, reference=True, num_epochs=2)
  assert work == {'model_flops': 92352.0, 'step_tokens': 3 * 2 + 3 * 3 + 5}


@pytest.mark.parametrize('kind, name', [
    ('TPU v4', 'TPU v4'), ('TPU v5 lite', 'TPU v5e'), ('TPU v5', 'TPU v5p'), ('v5p', 'TPU v5p'),
    ('TPU v6 lite', 'TPU v6e'), ('NVIDIA H100 80GB HBM3', 'H100 SXM'), ('H100', 'H100 SXM'),
    ('NVIDIA H100 PCIe', 'H100 PCIe'), ('NVIDIA H200', 'H200'), ('NVIDIA A100-SXM4-80GB', 'A100 80GB'),
    ('NVIDIA A100-SXM4-40GB', 'A100 40GB'), ('cpu', None), ('TPU v4 lite', None), ('TPU v3', None)])
def test_device_table(kind, name):
  found = flops.device_spec(kind)
  assert (found and found[0]) == name


def test_mfu_and_peaks():
  assert flops.peak_flops('TPU v5p', 'bfloat16') == 459e12
  assert flops.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 494.7e12  # TF32 at DEFAULT precision
  assert flops.peak_flops('cpu', 'bfloat16') is None
  assert flops.peak_flops('TPU v5p', 'int8') is None
  # 4 devices at half of 459 TFLOP/s for 2 s.
  assert flops.mfu(0.5 * 459e12 * 4 * 2, 2.0, 4, 'TPU v5p', 'bfloat16') == pytest.approx(0.5)
  assert flops.mfu(1e12, 1.0, 1, 'cpu') is None


def test_throughput_rates():
  work = {'model_flops': 0.25 * 989.4e12 * 8 * 3, 'step_tokens': 48000.0}
  rates = flops.throughput(work, 3.0, num_devices=8, device_kind='NVIDIA H100 80GB HBM3', dtype='bfloat16')
  assert rates == {'tokens_per_s_per_device': 2000.0, 'mfu': pytest.approx(0.25)}
  assert flops.throughput(work, 3.0, num_devices=8, device_kind='cpu', dtype='float32') == {
      'tokens_per_s_per_device': 2000.0}


def test_extra_sampling_flops_counts_dynamic_refills_and_prefix_continuations():
  from grpo_jax.pipeline.grpo import extra_sampling_flops
  from grpo_jax.rollout.rollout import Rollout
  cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=24)
  n, g, p, c = 6, 3, 5, 7
  completion_mask = (np.arange(c)[None] < np.array([2, 7, 4, 1, 3, 5])[:, None]).astype(np.int32)
  rollout = Rollout(np.zeros((n, p), np.int32), np.ones((n, p), np.int32), np.zeros((n, c), np.int32),
                    completion_mask, *(np.zeros((n, c), np.float32),) * 2, np.zeros(n, np.float32))
  assert extra_sampling_flops(cfg, rollout, {'dynamic_draws': 0}, group_size=g, continuations=4) == 0.0
  # Each refill: prefill once per prompt, decode to the longest output (7) against the cache, the reference forward.
  draw = (flops.forward_flops(cfg, batch=n // g, new_tokens=p)
          + flops.forward_flops(cfg, batch=n, new_tokens=7, cached=p)
          + flops.forward_flops(cfg, batch=n, new_tokens=p + c))
  got = extra_sampling_flops(cfg, rollout, {'dynamic_draws': 2}, group_size=g, continuations=4)
  assert math.isclose(got, 2 * draw, rel_tol=1e-12)
  # Prefix resampling: 12 prompts ++ prefixes of width p + c, K = 4 continuations each, 5 decode steps.
  stats = {'prefix_prompts': 12, 'prefix_prompt_len': p + c, 'prefix_decode_len': 5}
  cont = (flops.forward_flops(cfg, batch=12, new_tokens=p + c)
          + flops.forward_flops(cfg, batch=48, new_tokens=5, cached=p + c))
  assert math.isclose(extra_sampling_flops(cfg, rollout, stats, group_size=g, continuations=4), cont, rel_tol=1e-12)
