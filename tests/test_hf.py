"""Hugging Face checkpoints (models/hf.py) against transformers itself: logits, greedy generation, save, sharded
and bf16 checkpoints, and the errors for directories that do not fit. torch and transformers are test-only."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from grpo_jax.models import hf  # noqa: E402
from grpo_jax.models.transformer import Transformer  # noqa: E402
from grpo_jax.rollout.sampling import make_sampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# eos None: generation runs to max_new_tokens on both sides.
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
ARCHS = {
    # original_max_position_embeddings=64 puts RoPE frequencies in all three llama3 bands (kept, blended, scaled).
    'llama': lambda: transformers.LlamaConfig(**COMMON, rope_scaling=dict(
        rope_type='llama3', factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    'mistral': lambda: transformers.MistralConfig(**COMMON, sliding_window=4),  # < the sequences below
    'qwen2': lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    'qwen3': lambda: transformers.Qwen3Config(**COMMON, head_dim=24),  # head_dim != hidden / heads
    'gemma': lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
}
BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
LENGTHS, T, NEW = (12, 8, 5), 12, 6  # left-padded prompt batch; greedy tokens generated


def batch() -> tuple[np.ndarray, np.ndarray]:
  tokens = np.random.default_rng(0).integers(1, 97, (len(LENGTHS), T)).astype(np.int32)
  mask = np.arange(T)[None] >= T - np.asarray(LENGTHS)[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def hf_logits(model, tokens, mask) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def our_logits(model, tokens, mask) -> np.ndarray:
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, mask=m))
  return np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))


def flat_params(params) -> dict:
  return {k: np.asarray(v) for k, v in hf._flat(params).items()}


def build(name: str, root: Path) -> types.SimpleNamespace:
  """A tiny random transformers model, saved with save_pretrained, then loaded by us."""
  torch.manual_seed(0)
  ref = transformers.AutoModelForCausalLM.from_config(ARCHS[name](), attn_implementation='eager').eval()
  with torch.no_grad():  # weights big enough for O(1) logits with clear argmaxes (the 0.02 init is near uniform)
    for pname, p in ref.named_parameters():
      if 'norm' in pname:
        p.copy_((0.0 if name == 'gemma' else 1.0) + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.5 if 'lm_head' in pname or (name == 'qwen2' and 'embed' in pname) else 0.2)
  path = str(root / name)
  ref.save_pretrained(path)
  model, cfg = hf.load_model(path)
  tokens, mask = batch()
  return types.SimpleNamespace(name=name, ref=ref, path=path, model=model, cfg=cfg, tokens=tokens, mask=mask,
                               logits=our_logits(model, tokens, mask))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """built(name): each architecture's models, built once per module."""
  root = tmp_path_factory.mktemp('hf')
  return functools.cache(lambda name: build(name, root))


@pytest.fixture(scope='module', params=list(ARCHS))
def arch(request, built):
  return built(request.param)


# ----------------------------------------------------------------------------------------------- parity

def test_logits_match_transformers(arch):
  want = hf_logits(arch.ref, arch.tokens, arch.mask)
  assert arch.logits.shape == (3, T, 97) and arch.logits.dtype == np.float32
  assert np.abs(want[arch.mask]).max() > 1.0  # logits of a size where a wrong term would show
  np.testing.assert_allclose(arch.logits[arch.mask], want[arch.mask], atol=1e-4, rtol=0)
  assert arch.cfg.model_type == arch.name and arch.cfg.param_dtype == 'float32'


@pytest.mark.parametrize('name, off', [('llama', dict(rope_type='default')), ('mistral', dict(sliding_window=0))])
def test_architecture_options_matter(built, name, off):
  """The llama3 RoPE scaling and the sliding window change these logits: the parity test checks them."""
  arch = built(name)
  plain = nnx.eval_shape(lambda: Transformer(dataclasses.replace(arch.cfg, **off), nnx.Rngs(0)))
  nnx.update(plain, nnx.split(arch.model, nnx.Param)[1])
  diff = np.abs(our_logits(plain, arch.tokens, arch.mask) - arch.logits)[arch.mask].max()
  assert diff > 1e-2


def test_greedy_generation_matches_transformers(arch):
  graphdef, params = nnx.split(arch.model, nnx.Param)
  sampler = make_sampler(graphdef, max_new_tokens=NEW, eos_id=-1, pad_id=0, greedy=True)
  ours = np.asarray(sampler(params, jnp.asarray(arch.tokens), jnp.asarray(arch.mask), jax.random.key(0)).tokens)
  with torch.no_grad():
    out = arch.ref.generate(torch.tensor(arch.tokens, dtype=torch.long), do_sample=False, max_new_tokens=NEW,
                            attention_mask=torch.tensor(arch.mask, dtype=torch.long), pad_token_id=0)
  want = out[:, T:].numpy()
  # No near-ties along the path (else a 1e-6 difference could flip an argmax): the comparison is meaningful.
  full = np.concatenate([arch.tokens, want], 1)
  logits = hf_logits(arch.ref, full, np.concatenate([arch.mask, np.ones_like(want, bool)], 1))[:, T - 1:-1]
  top2 = np.sort(logits, -1)[..., -2:]
  assert np.all(top2[..., 1] - top2[..., 0] > 1e-4), 'near tie: pick another seed'
  np.testing.assert_array_equal(ours, want)


def test_save_model_loads_in_transformers_with_the_same_logits(arch, tmp_path):
  hf.save_model(arch.model, arch.cfg, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert hf.config_from_hf(json.load(f)) == arch.cfg
  # Same tensor names and shapes as transformers' own save_pretrained.
  ours, theirs = load_file(str(tmp_path / 'model.safetensors')), load_file(os.path.join(arch.path, 'model.safetensors'))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation='eager').eval()
  assert type(back) is type(arch.ref)
  got = hf_logits(back, arch.tokens, arch.mask)
  np.testing.assert_allclose(got[arch.mask], arch.logits[arch.mask], atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_identically(arch, tmp_path):
  arch.ref.save_pretrained(str(tmp_path), max_shard_size='50KB')
  assert (tmp_path / 'model.safetensors.index.json').exists() and len(list(tmp_path.glob('*.safetensors'))) > 2
  sharded = flat_params(hf.load_params(str(tmp_path), arch.cfg))
  single = flat_params(nnx.split(arch.model, nnx.Param)[1])
  assert sharded.keys() == single.keys()
  for k in single:
    np.testing.assert_array_equal(sharded[k], single[k], err_msg=str(k))


def test_bf16_checkpoint_loads(arch, tmp_path):
  copy.deepcopy(arch.ref).to(torch.bfloat16).save_pretrained(str(tmp_path))
  single = flat_params(nnx.split(arch.model, nnx.Param)[1])
  for dtype in (jnp.float32, 'bfloat16'):
    got = flat_params(hf.load_params(str(tmp_path), arch.cfg, dtype=dtype))
    for k, v in single.items():
      assert got[k].dtype == dtype, k
      np.testing.assert_array_equal(got[k].astype(np.float32), v.astype(jnp.bfloat16).astype(np.float32))
  model, cfg = hf.load_model(str(tmp_path), jnp.bfloat16)
  assert cfg.param_dtype == cfg.dtype == 'bfloat16' and model.embed[...].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------- mesh

MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from grpo_jax.models import hf
    from grpo_jax.parallel import sharding
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
    model, _ = hf.load_model(sys.argv[1], mesh=mesh)
    single, _ = hf.load_model(sys.argv[1])
    out = {}
    sharded, plain = hf._flat(nnx.split(model, nnx.Param)[1]), hf._flat(nnx.split(single, nnx.Param)[1])
    for k, x in sharded.items():
      assert np.array_equal(np.asarray(x), np.asarray(plain[k])), k
      for shard in x.addressable_shards:  # each device holds exactly its slice of the full array
        assert np.array_equal(np.asarray(shard.data), np.asarray(plain[k])[shard.index]), k
      out['/'.join(map(str, k))] = [str(a) for a in x.sharding.spec], list(x.addressable_shards[0].data.shape)
    print(json.dumps(out))
''')


def test_load_model_onto_a_mesh_places_each_slice(built):
  arch = built('qwen2')  # one architecture is enough; the subprocess costs seconds
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', MESH_SCRIPT, arch.path], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['blocks/0/attn/wq'] == [['fsdp', 'tensor', 'None'], [32, 2, 16]]  # [d, n, h] = [64, 4, 16]
  assert out['embed'] == [['None', 'fsdp'], [97, 32]]  # a vocab of 97 does not split in 2: replicated
  assert out['blocks/1/mlp/down'] == [['tensor', 'fsdp'], [64, 32]]


# --------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def llama_copy(built, tmp_path):
  dst = tmp_path / 'copy'
  shutil.copytree(built('llama').path, dst)
  return dst


def rewrite(path, edit):
  tensors = load_file(str(path / 'model.safetensors'))
  edit(tensors)
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})


def test_nonexistent_dir_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    hf.load_model(str(tmp_path / 'nowhere'))
  with pytest.raises(hf.CheckpointFormatError, match='config.json'):
    hf.load_model(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps(hf.config_to_hf(hf.config_from_hf(
      dict(model_type='llama', vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
           num_attention_heads=2)))))
  with pytest.raises(hf.CheckpointFormatError, match=r'no \*\.safetensors'):
    hf.load_model(str(tmp_path))
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not a pickle: must never be opened')
  with pytest.raises(hf.CheckpointFormatError, match=r"pytorch_model\.bin.*never unpickled.*save_pretrained"):
    hf.load_model(str(tmp_path))


@pytest.mark.parametrize('edit, match', [
    (lambda t: t.pop('model.layers.1.mlp.up_proj.weight'), r'missing tensors model\.layers\.1\.mlp\.up_proj\.weight'),
    (lambda t: t.update({'model.layers.0.extra.weight': np.zeros(3, np.float32)}),
     r'unexpected tensors model\.layers\.0\.extra\.weight'),
    (lambda t: t.update({'model.norm.weight': np.zeros(63, np.float32)}),
     r'model\.norm\.weight \(63,\) \(expected \(64,\)\)'),
    (lambda t: t.update({'model.norm.weight': np.zeros(64, np.int32)}), r'non-float tensors.*model\.norm\.weight I32'),
])
def test_tensors_that_do_not_fit_are_named_before_any_compile(llama_copy, edit, match):
  rewrite(llama_copy, edit)
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if name == BACKEND_COMPILE else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(hf.CheckpointFormatError, match=match):
      hf.load_model(str(llama_copy))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


def test_config_errors_name_the_option(built):
  with open(os.path.join(built('llama').path, 'config.json')) as f:
    base = json.load(f)
  for model_type in ('gpt2', 'gemma2', 'gemma3'):
    with pytest.raises(ValueError, match=f'{model_type}.*' + ', '.join(hf.SUPPORTED_MODEL_TYPES)):
      hf.config_from_hf({**base, 'model_type': model_type})
  bad = [(dict(attention_bias=True), 'attention_bias'), (dict(mlp_bias=True), 'mlp_bias'),
         (dict(rope_parameters=dict(rope_type='yarn', factor=2.0)), 'yarn'), (dict(hidden_act='relu'), 'hidden_act'),
         (dict(model_type='qwen2', use_sliding_window=True, sliding_window=4, max_window_layers=1), 'layer_types')]
  for overrides, match in bad:
    with pytest.raises(ValueError, match=match):
      hf.config_from_hf({**base, **overrides})


def test_config_formats(built):
  """transformers 4 files (top-level rope_theta, rope_scaling with 'type') read like transformers 5 ones."""
  arch = built('llama')
  with open(os.path.join(arch.path, 'config.json')) as f:
    v5 = json.load(f)
  rope = dict(v5.pop('rope_parameters'))
  v4 = {**v5, 'rope_theta': rope.pop('rope_theta'), 'rope_scaling': {'type': rope.pop('rope_type'), **rope},
        'head_dim': None}
  assert hf.config_from_hf(v4) == hf.config_from_hf({**v5, 'rope_parameters': dict(
      rope_type='llama3', rope_theta=10000.0, **rope)}) == arch.cfg
  assert arch.cfg.rope_type == 'llama3' and arch.cfg.rope_original_max_len == 64 and arch.cfg.head_dim == 16
  with pytest.raises(ValueError, match='qk_norm'):  # llama has no q/k norms
    hf.config_to_hf(dataclasses.replace(arch.cfg, qk_norm=True))
