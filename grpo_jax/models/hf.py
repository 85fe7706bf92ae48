"""Hugging Face checkpoints in and out: config.json + *.safetensors of Llama, Mistral, Qwen2, Qwen3 and Gemma;
in also from a llama.cpp .gguf file (Llama, Qwen2, Qwen3; see gguf.py) given in place of the directory.

    from grpo_jax.models import hf

    from grpo_jax.parallel import sharding
    model, model_cfg = hf.load_model('/ckpt/Qwen2.5-0.5B', jnp.bfloat16)    # or mesh=sharding.make_mesh(...)
    logits = model(tokens)                                                  # [b, t, v] float32
    hf.save_model(model, model_cfg, '/out/policy')  # AutoModelForCausalLM.from_pretrained('/out/policy') loads it

Weights are read only from safetensors, memory-mapped, and each array is assembled on its devices from the
slices they hold (`jax.make_array_from_callback`): no device, and no host buffer, holds more than one slice of
a tensor at a time. Pickled checkpoints (pytorch_model.bin) are never opened. Every check of the directory
(config, tensor names, shapes, dtypes) runs before any array is built; NaN / inf values are found while the
arrays are read, and refused before load_params returns.

A GGUF file's tensors are renamed to HF's names and layouts and read through the same slicing code; quantized
ones are dequantized to float32 first (gguf.GGUFTensor).

Layouts: HF Linear weights are [out, in]; ours are [in, ...] with the heads split out, e.g. q_proj.weight
[n*h, d] <-> wq [d, n, h] and o_proj.weight [d, n*h] <-> wo [n, h, d].
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers 'bfloat16' with numpy, so safetensors' numpy reader takes BF16 tensors
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

# gguf imports this module too (for CheckpointFormatError); neither reads the other's names at import time
from grpo_jax.models import gguf
from grpo_jax.models.transformer import MODEL_TYPES, ModelConfig, Transformer
from grpo_jax.parallel import sharding

SUPPORTED_MODEL_TYPES = MODEL_TYPES  # ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma')
_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                  'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM'}
# transformers' config-class defaults where they differ from the common ones (a config.json may omit a field).
_HF_DEFAULTS = {'mistral': dict(num_key_value_heads=8, sliding_window=4096),
                'qwen3': dict(head_dim=128), 'gemma': dict(head_dim=256, hidden_act='gelu_pytorch_tanh',
                                                          tie_word_embeddings=True)}
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh'}
_FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some old checkpoints saved; recomputed here


class CheckpointFormatError(ValueError):
  """The directory is not a checkpoint this module can read (the message names the file, option or tensors)."""


# ------------------------------------------------------------------------------------------------------ config

def config_from_hf(hf_config: dict) -> ModelConfig:
  """ModelConfig from the contents of a transformers config.json; options this model lacks raise."""
  c = dict(hf_config)
  model_type = c.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointFormatError(f'config.json model_type={model_type!r} is not supported; supported: '
                                f'{", ".join(SUPPORTED_MODEL_TYPES)}')
  c = {**_HF_DEFAULTS.get(model_type, {}), **c}
  need = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
  missing = [k for k in need if c.get(k) is None]
  if missing:
    raise CheckpointFormatError(f'config.json lacks {missing}')

  def unsupported(option, why=''):
    raise CheckpointFormatError(f'{model_type} config.json: {option}={c.get(option)!r} is not supported{why}')

  for option in ('attention_bias', 'mlp_bias', 'use_bidirectional_attention', 'quantization_config'):
    if c.get(option):
      unsupported(option)
  act = c.get('hidden_act', 'silu')
  if model_type == 'gemma' and act == 'gelu':
    act = 'gelu_pytorch_tanh'  # transformers' GemmaConfig does the same: the released 'gelu' meant the tanh form
  if act not in _ACTIVATIONS:
    unsupported('hidden_act', f' (only {list(_ACTIVATIONS)})')
  rope = _rope_from_hf(c)
  heads = c['num_attention_heads']
  return ModelConfig(
      vocab_size=c['vocab_size'], d_model=c['hidden_size'], num_layers=c['num_hidden_layers'], num_heads=heads,
      num_kv_heads=c.get('num_key_value_heads') or heads, head_dim=c.get('head_dim') or c['hidden_size'] // heads,
      mlp_dim=c['intermediate_size'], rms_eps=float(c.get('rms_norm_eps', 1e-6)),
      qkv_bias=model_type == 'qwen2', qk_norm=model_type == 'qwen3',
      tie_embeddings=bool(c.get('tie_word_embeddings', False)), model_type=model_type,
      activation=_ACTIVATIONS[act], norm_offset=1.0 if model_type == 'gemma' else 0.0,
      embed_scale=model_type == 'gemma', sliding_window=_sliding_window_from_hf(c),
      max_position_embeddings=int(c.get('max_position_embeddings') or 0), **rope)


def _rope_from_hf(c: dict) -> dict:
  # transformers 5 writes `rope_parameters`; older files have top-level rope_theta and `rope_scaling`, which
  # transformers prefers when both are present.
  params = dict(c.get('rope_scaling') or c.get('rope_parameters') or {})
  if any(k in params for k in ('full_attention', 'sliding_attention')):
    raise CheckpointFormatError(f'{c["model_type"]} config.json: per-layer rope_parameters are not supported')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  theta = float(params.get('rope_theta', c.get('rope_theta', 10000.0)))
  if params.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0)) != 1.0:
    raise CheckpointFormatError(f'{c["model_type"]} config.json: partial_rotary_factor is not supported')
  if rope_type == 'default':
    return dict(rope_theta=theta)
  if rope_type != 'llama3':
    raise CheckpointFormatError(f'{c["model_type"]} config.json: rope_type={rope_type!r} is not supported '
                                "(only 'default' and 'llama3')")
  try:
    return dict(rope_theta=theta, rope_type='llama3', rope_factor=float(params['factor']),
                rope_low_freq_factor=float(params['low_freq_factor']),
                rope_high_freq_factor=float(params['high_freq_factor']),
                rope_original_max_len=int(params.get('original_max_position_embeddings')
                                          or c['max_position_embeddings']))
  except KeyError as e:
    raise CheckpointFormatError(f'{c["model_type"]} config.json: llama3 RoPE needs {e.args[0]!r}') from e


def _sliding_window_from_hf(c: dict) -> int:
  if c['model_type'] == 'mistral':
    return int(c.get('sliding_window') or 0)
  if c['model_type'] not in ('qwen2', 'qwen3') or not c.get('use_sliding_window') or not c.get('sliding_window'):
    return 0
  # Qwen: only layers >= max_window_layers slide (transformers' default layer_types); one window for all only.
  n = c['num_hidden_layers']
  types = c.get('layer_types') or ['sliding_attention' if i >= c.get('max_window_layers', 28) else 'full_attention'
                                   for i in range(n)]
  if all(t == 'full_attention' for t in types):
    return 0
  if all(t == 'sliding_attention' for t in types):
    return int(c['sliding_window'])
  raise CheckpointFormatError(f'{c["model_type"]} config.json: sliding windows on some layers only (layer_types='
                              f'{types}) are not supported')


def config_to_hf(model_cfg: ModelConfig) -> dict:
  """config.json contents for `model_cfg` (transformers' AutoConfig loads them); raises if the architecture
  named by model_cfg.model_type cannot express the config."""
  m = model_cfg
  want = dict(qkv_bias=m.model_type == 'qwen2', qk_norm=m.model_type == 'qwen3',
              norm_offset=1.0 if m.model_type == 'gemma' else 0.0, embed_scale=m.model_type == 'gemma')
  if m.model_type in ('llama', 'gemma'):
    want['sliding_window'] = 0
  wrong = {k: getattr(m, k) for k, v in want.items() if getattr(m, k) != v}
  if wrong:
    raise ValueError(f'model_type={m.model_type!r} requires {({k: want[k] for k in wrong})}; the config has {wrong}')
  rope = {'rope_type': m.rope_type, 'rope_theta': m.rope_theta}
  if m.rope_type == 'llama3':
    rope.update(factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
  out = dict(
      architectures=[_ARCHITECTURES[m.model_type]], model_type=m.model_type, vocab_size=m.vocab_size,
      hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
      hidden_act={'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}[m.activation], rms_norm_eps=m.rms_eps,
      tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope_theta,  # rope_theta/rope_scaling: transformers 4
      rope_scaling=rope if m.rope_type != 'default' else None, rope_parameters=rope,
      torch_dtype=m.param_dtype, dtype=m.param_dtype)
  if m.max_position_embeddings:
    out['max_position_embeddings'] = m.max_position_embeddings
  if m.model_type in ('llama', 'qwen3', 'gemma'):
    out['attention_bias'] = False
  if m.model_type == 'mistral':
    out['sliding_window'] = m.sliding_window or None
  if m.model_type in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
               max_window_layers=0, layer_types=['sliding_attention' if m.sliding_window else 'full_attention']
               * m.num_layers)
  return out


def read_config(path: str) -> ModelConfig:
  """ModelConfig of the checkpoint directory `path` (its config.json), or of a .gguf file (its metadata)."""
  path = gguf.resolve_path(path)
  if gguf.is_gguf(path):
    return config_from_hf(gguf.hf_config(path))
  _check_dir(path)
  file = os.path.join(path, 'config.json')
  try:
    with open(file) as f:
      return config_from_hf(json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f'{file} is not valid JSON: {e}') from e


def _check_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise CheckpointFormatError(f'{path} has no config.json (expected a Hugging Face model directory)')


# ----------------------------------------------------------------------------------------------------- weights

def _layout(cfg: ModelConfig) -> dict[tuple, tuple[str, tuple[tuple[int, ...], ...]]]:
  """Our param path -> (HF tensor name, groups): HF axis j is our axes groups[j] merged (row-major), so an HF
  tensor becomes ours by a reshape to the grouped axes and a transpose."""
  out = {('embed',): ('model.embed_tokens.weight', ((0,), (1,))),
         ('final_norm', 'scale'): ('model.norm.weight', ((0,),))}
  if not cfg.tie_embeddings:
    out[('lm_head',)] = ('lm_head.weight', ((1,), (0,)))
  for i in range(cfg.num_layers):
    hf, ours = f'model.layers.{i}.', ('blocks', i)
    out[(*ours, 'attn_norm', 'scale')] = (hf + 'input_layernorm.weight', ((0,),))
    out[(*ours, 'mlp_norm', 'scale')] = (hf + 'post_attention_layernorm.weight', ((0,),))
    for ours_name, proj in (('wq', 'q'), ('wk', 'k'), ('wv', 'v')):
      out[(*ours, 'attn', ours_name)] = (f'{hf}self_attn.{proj}_proj.weight', ((1, 2), (0,)))  # [n*h, d]
      if cfg.qkv_bias:
        out[(*ours, 'attn', 'b' + proj)] = (f'{hf}self_attn.{proj}_proj.bias', ((0, 1),))
    out[(*ours, 'attn', 'wo')] = (hf + 'self_attn.o_proj.weight', ((2,), (0, 1)))  # [d, n*h]
    if cfg.qk_norm:
      out[(*ours, 'attn', 'q_norm', 'scale')] = (hf + 'self_attn.q_norm.weight', ((0,),))
      out[(*ours, 'attn', 'k_norm', 'scale')] = (hf + 'self_attn.k_norm.weight', ((0,),))
    for name in ('gate', 'up', 'down'):
      out[(*ours, 'mlp', name)] = (f'{hf}mlp.{name}_proj.weight', ((1,), (0,)))
  return out


def _hf_shape(shape: tuple[int, ...], groups) -> tuple[int, ...]:
  return tuple(math.prod(shape[a] for a in g) for g in groups)


def _read_slice(tensor, groups, shape: tuple[int, ...], index: tuple[slice, ...], dtype,
                on_nonfinite=None) -> np.ndarray:
  """Our block `index` of a parameter of `shape`, read from the (memory-mapped) HF tensor: only the rows and
  columns covering the block are read. A merged HF axis is sliced on its outer (first) of our axes.
  on_nonfinite() is called if the block, in `dtype`, holds a NaN or inf."""
  hf_index, block_shape = [], []
  for g in groups:
    start, stop, _ = index[g[0]].indices(shape[g[0]])
    inner = math.prod(shape[a] for a in g[1:])
    hf_index.append(slice(start * inner, stop * inner))
    block_shape += [stop - start] + [shape[a] for a in g[1:]]
  block = tensor[tuple(hf_index)].reshape(block_shape).transpose(np.argsort([a for g in groups for a in g]))
  outer = {g[0] for g in groups}
  with np.errstate(over='ignore'):  # an overflow to inf is reported by the check below, naming the tensor
    block = np.ascontiguousarray(block[tuple(slice(None) if a in outer else index[a] for a in range(len(shape)))],
                                 dtype=dtype)
  # Checked here, on the host copy just read, rather than on the devices afterwards: no compile, and the block is
  # still in cache. After the dtype conversion, so a float32 value that overflows float16 counts too.
  if on_nonfinite is not None and not np.isfinite(block).all():
    on_nonfinite()
  return block


def _open(file: str):
  """safe_open, with an error naming the file: safetensors' own (e.g. 'header too small') does not."""
  try:
    return safe_open(file, 'np')
  except (SafetensorError, OSError) as e:
    raise CheckpointFormatError(f'{file} is not a readable safetensors file ({e}): it is probably truncated or '
                                'corrupt (an interrupted download or copy). Re-download it, or compare its size '
                                'and checksum with the source.') from e


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from model.safetensors.index.json, model.safetensors or *.safetensors."""
  _check_dir(path)
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map', {})
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise CheckpointFormatError(f'{index} names files that do not exist: {absent}')
    return files
  shards = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not shards:
    pickles = sorted(os.path.basename(f) for ext in ('bin', 'pt', 'pth') for f in glob.glob(f'{path}/*.{ext}'))
    hint = (f' It has {pickles}: weights are only read from safetensors, pickled files are never unpickled. Convert '
            'once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir) writes '
            'safetensors.') if pickles else ''
    raise CheckpointFormatError(f'{path} has no *.safetensors files.{hint}')
  files = {}
  for shard in shards:
    with _open(shard) as f:
      for name in f.keys():
        if name in files:
          raise CheckpointFormatError(f'tensor {name} is in both {files[name]} and {shard}')
        files[name] = shard
  return files


@contextlib.contextmanager
def _open_tensors(path: str):
  """HF tensor name -> a lazily read tensor (get_shape, get_dtype, numpy slicing): safetensors' slices of the
  directory's files, kept open while the context lasts, or a GGUF file's tensors."""
  if gguf.is_gguf(path):
    yield gguf.read_tensors(path)
    return
  files = _tensor_files(path)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
    yield {name: handles[file].get_slice(name) for name, file in files.items()}


def load_params(path: str, model_cfg: ModelConfig, *, dtype=jnp.float32, shardings=None) -> nnx.State:
  """The nnx.Param state of Transformer(model_cfg), read from the safetensors in `path` (or a .gguf file).

  Args:
    path: a Hugging Face model directory (config.json is not read here; see read_config), or a .gguf file.
    model_cfg: the architecture the tensors must fit.
    dtype: dtype (or its name) of the returned arrays; the checkpoint's F16/BF16/F32/F64 are converted.
    shardings: optional, the tree of `sharding.tree_shardings(params, mesh)`; each array is then built directly
      in its sharding, every device reading only its own slice. Default: one device.
  Returns:
    nnx.State, the same tree as `nnx.split(Transformer(model_cfg, ...), nnx.Param)[1]`.
  """
  dtype = jnp.dtype(dtype)  # accepts 'bfloat16', jnp.bfloat16, np.float32, ...
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'dtype must be a float dtype, got {dtype}')
  path = gguf.resolve_path(path)
  layout = _layout(model_cfg)
  abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)[1]
  shapes = {k: x.shape for k, x in _flat(abstract).items()}
  assert set(shapes) == set(layout), set(shapes) ^ set(layout)  # _layout is out of step with model.py
  targets = _flat(shardings) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with _open_tensors(path) as tensors:
    _check_tensors(path, tensors, {name: _hf_shape(shapes[k], groups) for k, (name, groups) in layout.items()},
                   model_cfg)
    loaded, nonfinite = {}, set()
    for key, (name, groups) in layout.items():
      # Popped: a GGUF tensor's dequantized copy is then freed once its array is built, not held to the end.
      shape, tensor = shapes[key], tensors.pop(name)
      # The callbacks run here, once per addressable device, before make_array_from_callback returns.
      loaded[key] = jax.make_array_from_callback(
          shape, targets.get(key, default),
          lambda index, t=tensor, g=groups, s=shape, n=name: _read_slice(t, g, s, index, dtype,
                                                                        lambda: nonfinite.add(n)))
  _check_finite(path, [name for name, _ in layout.values()], nonfinite, dtype)
  nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(lambda kp, _: loaded[_key(kp)],
                                                                      nnx.to_pure_dict(abstract)))
  return abstract


def _check_finite(path: str, names: list[str], nonfinite: set[str], dtype) -> None:
  """Refuse NaN / inf weights: they would only show up later as NaN losses. Each process saw only its own slices,
  so with several processes the verdicts are combined first (every process must raise, or none)."""
  bad = np.array([n in nonfinite for n in names], np.int32)
  if jax.process_count() > 1:
    bad = np.asarray(multihost_utils.process_allgather(bad)).max(0)
  culprits = [n for n, b in zip(names, bad, strict=True) if b]
  if culprits:
    named = ', '.join(culprits[:5]) + (f' and {len(culprits) - 5} more' if len(culprits) > 5 else '')
    raise CheckpointFormatError(f'{path} has NaN or inf weights (read as {dtype.name}) in {len(culprits)} '
                                f'tensor{"s" * (len(culprits) > 1)}: {named}. The file is corrupt or was saved '
                                'after training diverged (or a value overflows this dtype): re-download it or use '
                                'an earlier checkpoint.')

def _key(key_path) -> tuple:
  return tuple(p.key for p in key_path)


def _flat(tree) -> dict[tuple, object]:
  """An nnx.State (or its pure dict) as {('blocks', 0, 'attn', 'wq'): leaf}."""
  pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
  return {_key(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _check_tensors(path: str, tensors: dict, expected: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
  ignored = lambda n: n.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == 'lm_head.weight')  # noqa: E731
  present = sorted(n for n in expected if n in tensors)
  problems = {
      'missing tensors': sorted(set(expected) - set(tensors)),
      'unexpected tensors': sorted(n for n in set(tensors) - set(expected) if not ignored(n)),
      'shape mismatches:': [f'{n} {tuple(tensors[n].get_shape())} (expected {expected[n]})' for n in present
                            if tuple(tensors[n].get_shape()) != expected[n]],
      f'non-float tensors (only {"/".join(_FLOAT_DTYPES)} are read):': [
          f'{n} {tensors[n].get_dtype()}' for n in present if tensors[n].get_dtype() not in _FLOAT_DTYPES]}
  found = [f'{what} {", ".join(names[:8])}' + (f' and {len(names) - 8} more' if len(names) > 8 else '')
           for what, names in problems.items() if names]
  if found:
    raise CheckpointFormatError(f'{path} does not fit the {cfg.model_type} config ({cfg.num_layers} layers, '
                                f'd_model {cfg.d_model}): ' + '; '.join(found))


def load_model(path: str, dtype=jnp.float32, *, compute_dtype=None, mesh: Mesh | None = None
               ) -> tuple[Transformer, ModelConfig]:
  """(model, model_cfg) from a Hugging Face model directory (config.json and *.safetensors) or a .gguf file.

  Params are stored in `dtype`; the forward computes in `compute_dtype` (default: dtype). With a mesh, params
  are sharded by `sharding.tree_shardings`.
  """
  path = gguf.resolve_path(path)
  model_cfg = dataclasses.replace(read_config(path), param_dtype=jnp.dtype(dtype).name,
                                  dtype=jnp.dtype(compute_dtype or dtype).name)
  model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  # Loading any checkpoint onto a mesh (eval, tools): a dim the mesh does not divide (an odd vocab) is replicated
  # rather than refused; the trainer's layout is strict unless config.sharding.allow_replication_fallback.
  lenient = sharding.Rules(allow_replication_fallback=True)
  shardings = sharding.tree_shardings(nnx.split(model, nnx.Param)[1], mesh, lenient) if mesh is not None else None
  nnx.update(model, load_params(path, model_cfg, dtype=dtype, shardings=shardings))
  return model, model_cfg


def save_model(model: Transformer, model_cfg: ModelConfig, path: str) -> None:
  """Write config.json and model.safetensors (HF names and layouts, params in their own dtype) to `path`.

  Sharded params are gathered to the host first; in a multi-process run every process must call this, and
  process 0 writes.
  """
  config = config_to_hf(model_cfg)  # raises before any gather if the architecture cannot express the config
  params, layout = _flat(nnx.split(model, nnx.Param)[1]), _layout(model_cfg)
  if set(params) != set(layout):
    raise ValueError(f'the model does not have the params of model_cfg: {sorted(set(params) ^ set(layout))}')
  if os.path.exists(os.path.join(path, 'model.safetensors.index.json')):
    raise ValueError(f'{path} holds a sharded checkpoint (model.safetensors.index.json); save to a fresh directory')
  tensors = {}
  for key, x in params.items():
    name, groups = layout[key]
    if not getattr(x, 'is_fully_addressable', True):  # other processes hold parts of it
      x = multihost_utils.process_allgather(x, tiled=True)
    host = np.asarray(x)
    tensors[name] = np.ascontiguousarray(host.transpose([a for g in groups for a in g]).reshape(
        _hf_shape(host.shape, groups)))
  config['torch_dtype'] = config['dtype'] = str(tensors['model.embed_tokens.weight'].dtype)  # what was written
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
