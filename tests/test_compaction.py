"""Compaction of the decode batch (grpo_jax/rollout/sampling.py CompactingSampler, make_sampler(decode_buckets=k)):
the rows still decoding move into a smaller batch at block boundaries, and the completions are the ones the
uncompacted sampler gives, greedy and sampled with a fixed key; the per-row length cap (max_lengths); the compile
bound; the 8-device mesh; the GSM8K benchmark's forced lengths (benchmarks/gsm8k_step.py) ending rows in the sampler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, count_compiles, load_config
from flax import nnx

from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.rollout.sampling import CompactingSampler, bucket_sizes, make_sampler

sys.path.insert(0, f'{ROOT}/benchmarks')
from gsm8k_step import force_lengths, forced_length_sampler  # noqa: E402

VOCAB, PAD, EOS = 40, 0, 5
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
NEW, BLOCK, G = 16, 4, 2  # 4 blocks of 4 tokens; 4 prompts x G = 8 rows
# Row lengths far apart: after the blocks ending at 4, 8, 12, rows 0, 3, 5, 7 then 0, 5, 7 then 0, 7 are live, so
# 4 buckets of 8 rows (8, 4, 2, 1) decode the blocks at 8, 4, 4, 2 rows (EOS may end a row sooner).
CAPS = np.array([16, 2, 3, 5, 1, 9, 4, 13], np.int32)
STATIC = dict(max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, decode_block=BLOCK, group_size=G)


def random_params(cfg: ModelConfig, seed: int = 0):
  """(graphdef, params): random weights large enough for peaked, position-dependent logits (an abstract build, fast)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed))), nnx.Param)
  rng = np.random.default_rng(seed)
  draw = lambda path, x: jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'  # noqa: E731
                                     else 0.3 * rng.standard_normal(x.shape), x.dtype)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return graphdef, state


def prompts_batch(lengths=(6, 2, 4, 1), p=6, seed=1):
  rng = np.random.default_rng(seed)
  mask = (np.arange(p)[None] >= p - np.asarray(lengths)[:, None]).astype(np.int32)
  return np.where(mask, rng.integers(1, VOCAB, (len(lengths), p)), PAD).astype(np.int32), mask


@pytest.fixture(scope='module')
def split():
  return random_params(CFG)


@pytest.fixture(scope='module')
def samplers(split):
  """{(greedy, compacting): sampler}, built once: each compiles its programs on first use."""
  return {(greedy, k > 1): make_sampler(split[0], greedy=greedy, decode_buckets=k, **STATIC)
          for greedy in (True, False) for k in (1, 4)}


@pytest.fixture(scope='module')
def no_eos(split):
  """(plain, compacting) samplers that never stop at a token, as benchmarks/gsm8k_step.py wants them: rows end at
  their caps only, so the buckets met are known."""
  static = {**STATIC, 'eos_id': (-1,), 'temperature': 1.0}
  return make_sampler(split[0], **static), make_sampler(split[0], decode_buckets=4, **static)


def expected_buckets(lengths, buckets: list[int], block: int = BLOCK, new: int = NEW) -> list[int]:
  """Rows each block decodes at: the smallest bucket holding the rows still live at its start (length > start)."""
  lengths = np.asarray(lengths)
  used = [len(lengths)]
  for start in range(block, new, block):
    live = int((lengths > start).sum())
    if not live:
      break
    used.append(min(used[-1], min(s for s in buckets if s >= live)))
  return used


def assert_same(got, want):
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=0, atol=1e-6)


def test_bucket_sizes():
  assert bucket_sizes(8, 4) == [8, 4, 2, 1]
  assert bucket_sizes(8, 1) == [8]
  assert bucket_sizes(24, 3) == [24, 12, 6]
  assert bucket_sizes(24, 3, multiple=8) == [24, 16, 8]  # each a multiple of the devices the batch is split over
  assert bucket_sizes(32, 5, multiple=8) == [32, 16, 8]  # 4 and 2 round up to 8: repeats dropped
  assert bucket_sizes(6, 4) == [6, 3, 2, 1]


@pytest.mark.parametrize('greedy', [True, False])
def test_compaction_gives_the_uncompacted_completions(split, samplers, greedy):
  """Greedy and sampled (one key): the same tokens, mask and logprobs as the uncompacted sampler, with the blocks
  after the first decoded at fewer rows; with caps and without (rows end at EOS only). Every XLA compilation the
  compacting sampler causes (what the trainer's 'compiles' metric counts) is one of its program_counts()."""
  graphdef, params = split
  prompts, mask = prompts_batch()
  plain, compact = samplers[greedy, False], samplers[greedy, True]
  assert isinstance(compact, CompactingSampler) and not isinstance(plain, CompactingSampler)
  compiles = 0
  for seed, caps in ((0, CAPS), (7, CAPS), (3, None)):
    if greedy and seed == 7:
      continue  # the key does not matter
    key = jax.random.key(seed)
    want = plain(params, prompts, mask, key, caps)
    got, n = count_compiles(lambda: compact(params, prompts, mask, key, caps))  # noqa: B023
    compiles += n
    assert_same(got, want)
    lengths = np.asarray(want.mask).sum(1)
    assert compact.last_buckets == expected_buckets(lengths, [8, 4, 2, 1])
    if caps is not None:
      assert (lengths <= caps).all() and len(set(lengths.tolist())) >= 5  # rows of very different lengths
      assert len(set(compact.last_buckets)) >= 3, compact.last_buckets  # several buckets used
  assert compiles == sum(compact.program_counts().values())


def test_compile_count_is_bounded(split, no_eos):
  """At most buckets x blocks decode programs, and a gather per (block, from, to) met, however the rows end; a
  call that meets only programs compiled before compiles nothing."""
  graphdef, params = split
  prompts, mask = prompts_batch()
  compact = no_eos[1]
  key = jax.random.key(0)
  # Lengths = caps: the blocks run at 8 4 4 2 / 8 8 8 8 / 8 1 1 1 / 8 4 2 1 rows.
  caps = [CAPS, np.full(8, NEW, np.int32), np.array([1, 1, 1, 1, 1, 1, 1, 16], np.int32),
          np.array([16, 1, 2, 7, 3, 1, 12, 2], np.int32)]
  used = set()
  for cap in caps:
    compact(params, prompts, mask, key, cap)
    assert compact.last_buckets == expected_buckets(cap, [8, 4, 2, 1])
    used.update(enumerate(compact.last_buckets))
  counts = compact.program_counts()
  blocks, buckets = len(compact.spans), len(bucket_sizes(8, 4))
  assert counts['prefill'] == 1 and len(used) <= counts['decode'] <= blocks * buckets  # other tests add their own
  assert counts['gather'] <= (blocks - 1) * buckets * (buckets - 1) // 2
  _, again = count_compiles(lambda: compact(params, prompts, mask, key, caps[0][::-1].copy()))
  assert again == 0 and compact.last_buckets == [8, 4, 4, 2]


def test_compacting_sampler_traced_is_the_plain_sampler(split, samplers):
  """Inside another jit (as pipeline/plan.py lowers the sampler) it is the one-program sample()."""
  graphdef, params = split
  prompts, mask = prompts_batch()
  compact = samplers[False, True]
  jitted = jax.jit(lambda *args: compact(*args))(params, prompts, mask, jax.random.key(0), CAPS)
  assert_same(jitted, samplers[False, False](params, prompts, mask, jax.random.key(0), CAPS))


def test_length_cap(split, samplers):
  """max_lengths[r]: row r ends after that many tokens, with the tokens it would have drawn uncapped; 0 = empty."""
  graphdef, params = split
  prompts, mask = prompts_batch()
  plain = samplers[False, False]
  free = jax.tree.map(np.asarray, plain(params, prompts, mask, jax.random.key(1)))
  caps = np.array([0, 1, 3, 16, 7, 2, 5, 11], np.int32)
  capped = jax.tree.map(np.asarray, plain(params, prompts, mask, jax.random.key(1), caps))
  free_lengths = free.mask.sum(1)
  np.testing.assert_array_equal(capped.mask.sum(1), np.minimum(free_lengths, caps))
  for r, n in enumerate(capped.mask.sum(1)):
    np.testing.assert_array_equal(capped.tokens[r, :n], free.tokens[r, :n])
    np.testing.assert_array_equal(capped.logprobs[r, :n], free.logprobs[r, :n])
    assert (capped.tokens[r, n:] == PAD).all() and (capped.logprobs[r, n:] == 0).all()
  assert (free_lengths > caps).sum() >= 4  # the caps, not EOS, ended most rows
  with pytest.raises(ValueError, match='one length per row'):
    plain(params, prompts, mask, jax.random.key(1), caps[:4])


def test_forced_length_benchmark_completions_unchanged(split, no_eos):
  """benchmarks/gsm8k_step.forced_length_sampler now ends rows in the sampler at their forced lengths; its
  completions are what it gave before (decode every row to the longest, then cut), with or without compaction."""
  graphdef, params = split
  prompts, mask = prompts_batch()
  lengths = [16, 1, 4, 7, 2, 9, 3, 12]
  plain, compact = no_eos
  before = force_lengths(plain(params, prompts, mask, jax.random.key(4)), np.asarray(lengths, np.int32),
                         eos_id=EOS, pad_id=PAD, replace_id=7)
  assert (np.asarray(before.mask).sum(1) == lengths).all()
  for sampler in (plain, compact):
    got = forced_length_sampler(sampler, lengths, eos_id=EOS, pad_id=PAD, replace_id=7)(
        params, prompts, mask, jax.random.key(4))
    assert_same(got, before)
  assert compact.last_buckets == [8, 4, 4, 1] == expected_buckets(lengths, [8, 4, 2, 1])


def test_decode_buckets_needs_blocks_and_is_checked(split):
  with pytest.raises(ValueError, match='needs decode_block > 0'):
    make_sampler(split[0], decode_buckets=2, **{**STATIC, 'decode_block': 0})
  with pytest.raises(ValueError, match='decode_buckets must be an int >= 1'):
    make_sampler(split[0], decode_buckets=0, **STATIC)
  cfg = load_config('tiny')
  n = jax.device_count()
  check_config(cfg, n)  # the default: 1, off
  for block, buckets in ((0, 2), (8, 0), (8, -1)):
    cfg.decode_block, cfg.decode_buckets = block, buckets
    with pytest.raises(ValueError, match=r'config\.decode_buckets'):
      check_config(cfg, n)
  cfg.decode_block, cfg.decode_buckets = 8, 4
  check_config(cfg, n)


@pytest.mark.parametrize('name', ['smollm2', 'default', 'gsm8k_hf'])
def test_configs_turn_it_on_where_blocks_are(name):
  """On for the real model (decode blocks, and decode cost that matters); off by default (no blocks: the default
  run's programs stay as they were) and for gsm8k_hf (no blocks: the 7B plan's memory)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert cfg.decode_buckets == (4 if name == 'smollm2' else 1)
  assert cfg.decode_buckets == 1 or cfg.decode_block > 0


MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_compaction import CFG, PAD, EOS, prompts_batch, random_params
    from grpo_jax.parallel import sharding
    from grpo_jax.rollout.sampling import make_sampler
    assert jax.device_count() == 8
    graphdef, params = random_params(CFG)
    prompts, mask = prompts_batch(lengths=(6, 2, 4, 1, 5, 3, 6, 2))  # 8 prompts x G = 4: 32 rows
    caps = np.full(32, 2, np.int32)  # 15 rows live after 4 tokens, 3 after 8 (fewer if EOS comes first)
    caps[[0, 3, 5, 8, 10, 13, 16, 18, 21, 24, 27, 29]] = 6
    caps[[1, 14, 30]] = 12
    static = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, decode_block=4, group_size=4, temperature=0.8)
    want = make_sampler(graphdef, **static)(params, prompts, mask, jax.random.key(2), caps)  # one device
    out = {}
    for name, shape in (('data', (8, 1, 1)), ('all', (2, 2, 2))):
        mesh = sharding.make_mesh(dict(zip(('data', 'fsdp', 'tensor'), shape)))
        shardings = sharding.tree_shardings(params, mesh)
        sampler = make_sampler(graphdef, param_shardings=shardings, mesh=mesh, decode_buckets=4, **static)
        got = sampler(params, prompts, mask, jax.random.key(2), caps)
        out[name] = dict(buckets=sampler.last_buckets, tokens=bool((np.asarray(got.tokens) == want.tokens).all()),
                         mask=bool((np.asarray(got.mask) == want.mask).all()),
                         logprobs=float(np.abs(np.asarray(got.logprobs) - want.logprobs).max()),
                         lengths=np.asarray(got.mask).sum(1).tolist())
    print(json.dumps(out))
''')


def test_sharded_compaction_matches_one_device(tmp_path):
  """On 8 CPU devices (batch split over 8, and over data x fsdp with kv heads split over tensor): buckets are
  multiples of the batch's devices, and the completions are one device's uncompacted ones."""
  script = tmp_path / 'mesh.py'
  script.write_text(MESH_SCRIPT)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, str(script), os.path.join(ROOT, 'tests')], env=env, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  lengths = out['data']['lengths']
  assert out['all']['lengths'] == lengths
  for name, multiple in (('data', 8), ('all', 4)):  # the batch over 8 devices; over data x fsdp = 4
    want = expected_buckets(lengths, bucket_sizes(32, 4, multiple), block=4, new=12)
    assert out[name]['buckets'] == want and len(set(want)) == 3, (name, out[name])
    assert out[name]['tokens'] and out[name]['mask'] and out[name]['logprobs'] < 1e-5, (name, out[name])
