"""Decode speed against the memory-bandwidth roofline, and GRPO train-step MFU, on one accelerator (issue 4,
item 5), for a ~1.1B Llama-shaped model with random weights.

  python benchmarks/accelerator.py                 # on jax's first device: JSON line on stdout, summary on stderr
  python benchmarks/accelerator.py --preset tiny   # seconds on CPU: checks that the script runs

Model '1b': TinyLlama-1.1B's shapes (vocab 32000, d 2048, 22 layers, 32 query / 4 KV heads of 64, MLP 5632),
bf16 parameters and compute.

Decode: the trainer's sampler (KV cache, one prefill per prompt shared by its G samples) on --batch rows
(--batch / G prompts x G) of --prompt_len tokens, every row running to --new_tokens. One token step takes
(t(new_tokens) - t(1)) / (new_tokens - 1): the prefill and the first token cancel out. Its roofline reads each
weight once plus the keys and values of the slots attended so far (at least prompt_len + i at step i, bf16):
bytes / the device's HBM bandwidth (grpo_jax/models/flops.py). Target: >= 70% of roofline.

Train: one GRPO train step (clipped objective with k3 KL, AdamW on an fp32 master copy, grad clipping) on
--train_rows rows of prompt_len + new_tokens tokens (groups of G rows sharing a prompt), in --grad_accum
micro-batches, both ways the trainer can run it: 'train' with each prompt's forward once per group
(rl.shared_prompt, the default) and 'train_repeated_prompt' with prompt ++ completion per row. MFU = 3 x the
forward's model FLOPs (the path's own count: flops.grpo_step_flops) / step time / the device's bf16 peak.
Target: >= 40%.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models import flops
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.sampling import make_sampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from micro import BETA, median_step_time, median_time  # noqa: E402

MODELS = {
    '1b': dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64,
               mlp_dim=5632, rope_theta=10000.0, rms_eps=1e-5),
    'tiny': dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
}
PRESETS = {  # flag defaults per preset; flags given on the command line win
    '1b': dict(batch=64, prompt_len=128, new_tokens=256, train_rows=32, grad_accum=4, repeats=5),
    'tiny': dict(batch=16, prompt_len=8, new_tokens=8, train_rows=16, grad_accum=2, repeats=2),
}
GROUP_SIZE = 8


def decode_roofline_bytes(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Bytes one decode step must read, averaged over the steps: every matmul weight once, and the bf16 keys
  and values of the prompt_len + i slots attended at step i = 1..new_tokens."""
  weight_bytes = flops.matmul_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize
  slots = prompt_len + (new_tokens + 1) / 2
  kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * slots * batch * jnp.dtype(cfg.dtype).itemsize
  return weight_bytes + kv_bytes


def measure_decode(graphdef, params, cfg: ModelConfig, args, spec) -> dict:
  rng = np.random.default_rng(0)
  num_prompts = args.batch // GROUP_SIZE
  prompts = rng.integers(3, cfg.vocab_size, (num_prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts)

  def sampler_time(new_tokens: int) -> float:
    sampler = make_sampler(graphdef, max_new_tokens=new_tokens, eos_id=-1, pad_id=0, temperature=1.0,
                           group_size=GROUP_SIZE, decode_block=args.decode_block)  # eos -1: fixed length
    return median_time(sampler, params, prompts, mask, jax.random.key(0), repeats=args.repeats)

  full, one = sampler_time(args.new_tokens), sampler_time(1)
  step = (full - one) / (args.new_tokens - 1)
  out = {'batch': args.batch, 'prompt_len': args.prompt_len, 'new_tokens': args.new_tokens,
         'decode_block': args.decode_block, 'sampler_call_s': full, 'prefill_and_first_token_s': one,
         'token_step_s': step, 'decode_tokens_per_s': args.batch / step,
         'roofline_bytes_per_step': decode_roofline_bytes(cfg, batch=args.batch, prompt_len=args.prompt_len,
                                                          new_tokens=args.new_tokens)}
  if spec is not None:
    out['roofline_step_s'] = out['roofline_bytes_per_step'] / spec.hbm_bytes_per_s
    out['fraction_of_roofline'] = out['roofline_step_s'] / step
  return out


def measure_train(graphdef, params, cfg: ModelConfig, args, device_kind: str, *, shared_prompt: bool) -> dict:
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  opt_cfg = ConfigDict(dict(lr=1e-6, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0,
                            master_dtype='float32'))
  tx = make_optimizer(opt_cfg, 100, param_dtype=cfg.param_dtype)
  state = init_state(params, tx, mesh)
  group = GROUP_SIZE if shared_prompt else 1
  loss_fn = functools.partial(grpo_objective, config=LossConfig(remat=args.remat, shared_prompt_group=group))
  train_step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh),
                               mesh, grad_accum_steps=args.grad_accum, group_size=group)
  rng = np.random.default_rng(1)
  rows, p, c = args.train_rows, args.prompt_len, args.new_tokens
  logprobs = lambda: (-3.0 + 0.1 * rng.standard_normal((rows, c))).astype(np.float32)  # noqa: E731
  prompts = np.repeat(rng.integers(3, cfg.vocab_size, (rows // GROUP_SIZE, p)), GROUP_SIZE, axis=0).astype(np.int32)
  rollout = Rollout(prompts, np.ones((rows, p), np.int32),
                    rng.integers(3, cfg.vocab_size, (rows, c)).astype(np.int32), np.ones((rows, c), np.int32),
                    logprobs(), logprobs(), rng.standard_normal(rows).astype(np.float32))
  state, metrics = jax.block_until_ready(train_step(state, rollout, BETA))  # compiles
  step = median_step_time(train_step, state, rollout, args.repeats)
  model_flops = flops.grpo_step_flops(cfg, num_prompts=rows // GROUP_SIZE, group_size=GROUP_SIZE, prompt_len=p,
                                      completion_len=c, reference=False, shared_prompt=shared_prompt
                                      )['policy_forward_backward']
  out = {'shared_prompt': shared_prompt, 'rows': rows, 'tokens_per_row': p + c, 'grad_accum': args.grad_accum,
         'remat': args.remat,
         'step_s': step, 'model_flops': model_flops, 'tokens_per_s': rows * (p + c) / step,
         'loss_is_finite': bool(np.isfinite(float(metrics['loss'])))}
  utilization = flops.mfu(model_flops, step, 1, device_kind, cfg.dtype)
  if utilization is not None:
    out['mfu'] = utilization
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', choices=sorted(PRESETS), default='1b')
  for name, kind in (('batch', int), ('prompt_len', int), ('new_tokens', int), ('train_rows', int),
                     ('grad_accum', int), ('repeats', int)):
    ap.add_argument(f'--{name}', type=kind, default=None, help='default: from --preset')
  ap.add_argument('--decode_block', type=int, default=0, help='config.decode_block of the sampler')
  ap.add_argument('--remat', default='none', help="model.remat of the train step: 'none', 'full', 'save_dots'")
  ap.add_argument('--skip', choices=['decode', 'train'], default=None)
  args = ap.parse_args()
  for name, value in PRESETS[args.preset].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.batch % GROUP_SIZE or args.new_tokens < 2 or args.train_rows % (args.grad_accum * GROUP_SIZE):
    ap.error(f'need --batch divisible by G={GROUP_SIZE}, --new_tokens >= 2, --train_rows divisible by --grad_accum '
             f'x G={GROUP_SIZE}')

  device = jax.devices()[0]
  found = flops.device_spec(device.device_kind)
  spec = found[1] if found else None
  cfg = ModelConfig(**MODELS[args.preset], param_dtype='bfloat16', dtype='bfloat16')
  graphdef, params = nnx.split(nnx.jit(lambda: Transformer(cfg, nnx.Rngs(0)))(), nnx.Param)  # built on device
  result = {'date': time.strftime('%Y-%m-%d'), 'device_kind': device.device_kind, 'platform': device.platform,
            'device_spec': found[0] if found else None, 'jax_version': jax.__version__, 'preset': args.preset,
            'model': {**MODELS[args.preset], 'n_params': int(sum(x.size for x in jax.tree.leaves(params))),
                      'dtype': 'bfloat16'}}
  if args.skip != 'decode':
    result['decode'] = measure_decode(graphdef, params, cfg, args, spec)
  if args.skip != 'train':
    # A copy for the first: the train step donates its state, and the state holds the params' buffers.
    result['train'] = measure_train(graphdef, jax.tree.map(jnp.copy, params), cfg, args, device.device_kind,
                                    shared_prompt=True)
    result['train_repeated_prompt'] = measure_train(graphdef, params, cfg, args, device.device_kind,
                                                    shared_prompt=False)
  decode, train = result.get('decode', {}), result.get('train', {})
  print(f"[{device.device_kind}] {result['model']['n_params'] / 1e9:.2f}B params, bf16", file=sys.stderr)
  if decode:
    print(f"decode: {decode['decode_tokens_per_s']:.0f} tok/s at batch {args.batch}, "
          f"{1e3 * decode['token_step_s']:.2f} ms/step; roofline fraction "
          f"{decode.get('fraction_of_roofline', float('nan')):.2f} (target >= 0.70)", file=sys.stderr)
  for name in ('train', 'train_repeated_prompt') if train else ():
    t = result[name]
    print(f"{name}: {t['step_s']:.3f} s/step, {t['tokens_per_s']:.0f} tok/s; MFU "
          f"{t.get('mfu', float('nan')):.2f} (target >= 0.40)", file=sys.stderr)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
