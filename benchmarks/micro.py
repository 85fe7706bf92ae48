"""Microbenchmarks: sampler tokens/s (KV cache vs recomputing the prefix), train-step tokens/s, and the peak
memory of the logprob computation against vocabulary size.

  python benchmarks/micro.py                       # all three, JSON lines on stdout, tables on stderr
  python benchmarks/micro.py --only logprob_memory --vocab 1024,32768,131072

Model: the Qwen2-shaped model of benchmarks/grpo_step_bench.py (vocab 49, d 256, 4 layers), random weights,
fp32, 13-token prompts. Times are medians of --repeats calls after a warm-up call (compilation excluded). The
logprob memory is XLA's own buffer assignment of the compiled gradient (temporaries, bytes), so it does not
depend on machine load; a single layer and a small d_model make the vocabulary dominate it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from grpo_jax.core.logprobs import sequence_logprobs
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.sampling import make_sampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step_bench import MODEL  # noqa: E402

VOCAB, PROMPT_LEN, PAD_ID = 49, 13, 0


def median_time(fn, *args, repeats: int) -> float:
  """Median wall time of fn(*args) over `repeats` calls after one warm-up (compiling) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


BETA = {'beta': np.float32(0.04)}  # the GRPO train step's hparams: the paper's KL weight


def median_step_time(step, state, batch, repeats: int) -> float:
  """median_time of a donating train step: the state is threaded through the calls."""
  state, _ = jax.block_until_ready(step(state, batch, BETA))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, batch, BETA))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def build(vocab: int = VOCAB, **overrides):
  cfg = ModelConfig(vocab_size=vocab, **{**MODEL, **overrides})
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  return cfg, graphdef, params


def make_recompute_sampler(graphdef, *, max_new_tokens: int):
  """Sampling without a KV cache: every step runs the full forward over the fixed [b, p + max_new_tokens]
  buffer and reads the logits at the current position (one compile, O(length^2) work)."""
  def sample(params, prompt_tokens, rng):
    model = nnx.merge(graphdef, params)
    b, p = prompt_tokens.shape
    tokens = jnp.concatenate([prompt_tokens, jnp.full((b, max_new_tokens), PAD_ID, jnp.int32)], axis=1)

    def one(step, tokens):
      logits = model(tokens)[:, p - 1 + step]  # causal: later pad slots do not affect this position
      token = jax.random.categorical(jax.random.fold_in(rng, step), logits).astype(jnp.int32)
      return tokens.at[:, p + step].set(token)

    return jax.lax.fori_loop(0, max_new_tokens, one, tokens)[:, p:]
  return jax.jit(sample)


def sampler_rows(batches, lengths, repeats: int, recompute_max_len: int, recompute_max_batch: int):
  _, graphdef, params = build()
  for length in lengths:
    cached = make_sampler(graphdef, max_new_tokens=length, eos_id=-1, pad_id=PAD_ID, temperature=1.0)
    recompute = make_recompute_sampler(graphdef, max_new_tokens=length)
    for batch in batches:
      prompts = jax.random.randint(jax.random.key(batch), (batch, PROMPT_LEN), 4, VOCAB, jnp.int32)
      ones = jnp.ones_like(prompts)
      row = {'bench': 'sampler', 'batch': batch, 'length': length}
      t = median_time(cached, params, prompts, ones, jax.random.key(0), repeats=repeats)
      row['kv_cache_tokens_per_s'] = round(batch * length / t, 1)
      if length <= recompute_max_len and batch <= recompute_max_batch:
        t = median_time(recompute, params, prompts, jax.random.key(0), repeats=repeats)
        row['recompute_tokens_per_s'] = round(batch * length / t, 1)
        row['kv_cache_speedup'] = round(row['kv_cache_tokens_per_s'] / row['recompute_tokens_per_s'], 2)
      yield row


def train_step_rows(batches, lengths, repeats: int):
  _, graphdef, params = build()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = make_optimizer(ConfigDict(dict(lr=1e-5, warmup_steps=0, schedule='constant', weight_decay=0.0,
                                      grad_clip=1.0, master_dtype='float32')), 100)
  loss_fn = functools.partial(grpo_objective, config=LossConfig())
  for length in lengths:
    for batch in batches:
      state = init_state(jax.tree.map(jnp.copy, params), tx, mesh)
      step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh)
      rng = np.random.RandomState(0)
      rollout = Rollout(rng.randint(4, VOCAB, (batch, PROMPT_LEN)).astype(np.int32),
                        np.ones((batch, PROMPT_LEN), np.int32),
                        rng.randint(4, VOCAB, (batch, length)).astype(np.int32), np.ones((batch, length), np.int32),
                        -rng.rand(batch, length).astype(np.float32), -rng.rand(batch, length).astype(np.float32),
                        rng.randn(batch).astype(np.float32))
      t = median_step_time(step, state, rollout, repeats)
      yield {'bench': 'train_step', 'batch': batch, 'length': length,
             'tokens_per_s': round(batch * (PROMPT_LEN + length) / t, 1), 'step_s': round(t, 4)}


def logprob_memory_rows(vocabs, chunks, batch: int, length: int):
  for vocab in vocabs:
    _, graphdef, params = build(vocab, d_model=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                                mlp_dim=128)
    args = (jax.ShapeDtypeStruct((batch, PROMPT_LEN), jnp.int32), jax.ShapeDtypeStruct((batch, PROMPT_LEN), jnp.int32),
            jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), jnp.int32))
    row = {'bench': 'logprob_memory', 'vocab': vocab, 'batch': batch, 'length': length,
           'full_logits_mib': round(batch * (PROMPT_LEN + length) * vocab * 4 / 2**20, 1)}
    for chunk in chunks:
      def loss(params, *arrays, chunk=chunk, graphdef=graphdef):
        return sequence_logprobs(nnx.merge(graphdef, params), *arrays, chunk_size=chunk).sum()
      compiled = jax.jit(jax.grad(loss)).lower(params, *args).compile()
      row[f'grad_temp_mib_chunk{chunk}'] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    yield row


def table(rows: list[dict]) -> str:
  keys = list(dict.fromkeys(k for r in rows for k in r if k != 'bench'))
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |' for r in rows]
  return '\n'.join(lines)


def ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--only', choices=['sampler', 'train_step', 'logprob_memory'], action='append')
  ap.add_argument('--batches', type=ints, default=[1, 8, 32, 128])
  ap.add_argument('--lengths', type=ints, default=[32, 128, 512])
  ap.add_argument('--recompute_max_len', type=int, default=128, help='longer lengths skip the O(L^2) sampler')
  ap.add_argument('--recompute_max_batch', type=int, default=32, help='larger batches skip the O(L^2) sampler')
  ap.add_argument('--train_batches', type=ints, default=[8, 32])
  ap.add_argument('--train_lengths', type=ints, default=[32, 128])
  ap.add_argument('--vocab', type=ints, default=[1024, 8192, 32768, 131072])
  ap.add_argument('--chunks', type=ints, default=[0, 32, 8])
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  benches = {
      'sampler': lambda: sampler_rows(args.batches, args.lengths, args.repeats, args.recompute_max_len,
                                      args.recompute_max_batch),
      'train_step': lambda: train_step_rows(args.train_batches, args.train_lengths, args.repeats),
      'logprob_memory': lambda: logprob_memory_rows(args.vocab, args.chunks, batch=32, length=128),
  }
  print(f'[micro] jax {jax.__version__}, {os.cpu_count()} cpus, {jax.devices()[0].device_kind}', file=sys.stderr)
  for name in args.only or list(benches):
    rows = []
    for row in benches[name]():
      rows.append(row)
      print(json.dumps(row), flush=True)
    print(f'\n{name}\n{table(rows)}\n', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
