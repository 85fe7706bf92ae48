"""Config validation that runs before anything is built or compiled, so bad input fails in a second."""
from __future__ import annotations

import math
import os

from absl import app

from grpo_jax.core.advantages import ADVANTAGES
from grpo_jax.core.kl import KL_ESTIMATORS
from grpo_jax.data.datasets import DATASETS
from grpo_jax.data.prompts import CHAT_MODES, resolve_template
from grpo_jax.models.lora import TARGETS, parse_names
from grpo_jax.models.transformer import REMAT_POLICIES
from grpo_jax.parallel.sharding import MESH_AXES, mesh_shape
from grpo_jax.pipeline.setup import STAGES, layout_rules
from grpo_jax.rewards.registry import REWARDS


def _positive(cfg, *paths: str) -> None:
  for path in paths:
    value = cfg
    for part in path.split('.'):
      value = value[part]
    if not value > 0:
      raise ValueError(f'config.{path} must be positive, got {value}')


def _check_task(cfg) -> None:
  task = cfg.task
  known = ['arithmetic', 'jsonl', *DATASETS]
  if task.name not in known:
    raise ValueError(f'config.task.name={task.name!r} is unknown; known: {known}')
  if task.name == 'arithmetic':
    _positive(cfg, 'task.num_train', 'task.num_val', 'task.num_test')
  elif task.num_val < 0 or task.num_test < 0:
    raise ValueError(f'config.task.num_val and num_test must be >= 0, got {task.num_val}, {task.num_test}')
  if task.name != 'arithmetic' and not cfg.model.path:
    raise ValueError(f'config.task.name={task.name!r} needs a tokenizer: set config.model.path to a local '
                     'Hugging Face model directory')
  if task.name == 'jsonl':
    for key in ('train_file', 'test_file'):
      if not os.path.isfile(task[key]):
        raise FileNotFoundError(f'config.task.{key}={task[key]!r} is not a file')
  resolve_template(task.prompt_template)
  if task.chat not in CHAT_MODES:
    raise ValueError(f'config.task.chat={task.chat!r} is unknown; known: {CHAT_MODES}')


def _check_model_path(path: str) -> None:
  if not path:
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.model.path={path!r} is not a directory (a local Hugging Face model: '
                            'config.json, *.safetensors and the tokenizer files)')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'config.model.path={path!r} has no config.json')


def _check_memory_knobs(cfg) -> None:
  """model.remat, model.logprob_chunk, {sft,rl}.master_dtype (grad_accum_steps: check_batch_layout)."""
  remat = cfg.model.remat
  if remat not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat={remat!r} is unknown; known: {list(REMAT_POLICIES)}')
  chunk = cfg.model.logprob_chunk
  if not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f'config.model.logprob_chunk must be an int >= 0 (0 = off), got {chunk!r}')
  for section in ('sft', 'rl'):  # each training stage's optimizer section
    master = cfg[section].master_dtype
    if master not in ('float32', ''):
      raise ValueError(f"config.{section}.master_dtype={master!r} must be 'float32' or '' (off)")


def _check_runtime_knobs(cfg) -> None:
  """decode_block and compile_cache_dir: how the sampler loops and where compiled executables are kept."""
  block = cfg.decode_block
  if not isinstance(block, int) or block < 0:
    raise ValueError(f'config.decode_block must be an int >= 0 (0 = one decode loop), got {block!r}')
  cache = cfg.compile_cache_dir
  if not isinstance(cache, str):
    raise ValueError(f"config.compile_cache_dir must be a directory path or '' (off), got {cache!r}")
  if cache and os.path.exists(os.path.expanduser(cache)) and not os.path.isdir(os.path.expanduser(cache)):
    raise ValueError(f'config.compile_cache_dir={cache!r} exists and is not a directory')


def _check_lora(lora_cfg) -> None:
  """config.lora: rank an int >= 0; with rank > 0, alpha > 0 and at least one target and stage."""
  rank = lora_cfg.rank
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f'config.lora.rank must be an int >= 0 (0 = off: full fine-tuning), got {rank!r}')
  targets = parse_names(lora_cfg.targets, TARGETS, 'config.lora.targets')
  stages = parse_names(lora_cfg.stages, STAGES, 'config.lora.stages')
  if rank == 0:
    return
  alpha = lora_cfg.alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f'config.lora.alpha must be a positive number (scale = alpha / rank), got {alpha!r}')
  if not targets or not stages:
    raise ValueError(f'config.lora.rank={rank} needs at least one target and one stage, got '
                     f'targets={lora_cfg.targets!r}, stages={lora_cfg.stages!r}')



def _check_finite(tree, path: str = 'config') -> None:
  """Every number in the config is finite: a nan beta passes `beta < 0` and trains NaN silently."""
  items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
  for key, value in items:
    where = f'{path}.{key}' if isinstance(tree, dict) else f'{path}[{key}]'
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{where} must be a finite number, got {value}')
    _check_finite(value, where)


def check_config(cfg, num_devices: int) -> None:
  """Raise ValueError naming the first bad knob."""
  _check_finite(cfg.to_dict())
  if isinstance(cfg.max_nonfinite_steps, bool) or not isinstance(cfg.max_nonfinite_steps, int) or \
     cfg.max_nonfinite_steps < 1:
    raise ValueError(f'config.max_nonfinite_steps must be an int >= 1, got {cfg.max_nonfinite_steps!r}')
  _positive(cfg, 'max_prompt_len', 'max_new_tokens', 'sft.batch_size', 'sft.eval_every', 'sft.lr', 'rl.num_steps',
            'rl.num_prompts', 'rl.num_epochs', 'rl.num_minibatches', 'rl.lr', 'rl.temperature', 'eval.batch_size',
            'checkpoint_every', 'checkpoint_keep', 'log_every')
  if cfg.sft.max_steps < 0:
    raise ValueError(f'config.sft.max_steps must be >= 0 (0 skips SFT), got {cfg.sft.max_steps}')
  _check_task(cfg)
  _check_model_path(cfg.model.path)
  _check_memory_knobs(cfg)
  _check_runtime_knobs(cfg)
  _check_lora(cfg.lora)
  if cfg.rl.group_size < 2:
    raise ValueError(f'config.rl.group_size (G) must be >= 2 for a group baseline, got {cfg.rl.group_size}')
  if not 0 < cfg.rl.clip_eps < 1:
    raise ValueError(f'config.rl.clip_eps must be in (0, 1), got {cfg.rl.clip_eps}')
  if cfg.rl.beta < 0:
    raise ValueError(f'config.rl.beta must be >= 0, got {cfg.rl.beta}')
  if cfg.rl.kl_target < 0 or not cfg.rl.kl_horizon > 0:
    raise ValueError(f'config.rl.kl_target must be >= 0 (0 = a fixed beta) and config.rl.kl_horizon > 0, got '
                     f'{cfg.rl.kl_target}, {cfg.rl.kl_horizon}')
  if cfg.rl.kl_target > 0 and not cfg.rl.beta > 0:
    raise ValueError(f'config.rl.kl_target={cfg.rl.kl_target} needs config.rl.beta > 0: the controller scales beta '
                     '(and the KL it measures needs the reference forward that beta > 0 runs)')
  if not 0 < cfg.rl.top_p <= 1 or cfg.rl.top_k < 0:
    raise ValueError(f'config.rl.top_p must be in (0, 1] and top_k >= 0, got {cfg.rl.top_p}, {cfg.rl.top_k}')
  if not 0 <= cfg.sft.target_accuracy <= 1:
    raise ValueError(f'config.sft.target_accuracy must be in [0, 1], got {cfg.sft.target_accuracy}')
  for key, registry in (('rl.kl_estimator', KL_ESTIMATORS), ('rl.advantage', ADVANTAGES), ('rl.reward', REWARDS),
                        ('task.verifier', REWARDS)):
    group, name = key.split('.')
    if cfg[group][name] not in registry:
      raise ValueError(f'config.{key}={cfg[group][name]!r} is unknown; known: {sorted(registry)}')
  check_batch_layout(cfg, num_devices)


def check_batch_layout(cfg, num_devices: int) -> None:
  """The mesh fits num_devices and every batch splits evenly (minibatches, data-parallel shards); grpo_jax.plan
  runs this alone, without the task and model checks."""
  rollout_size = cfg.rl.num_prompts * cfg.rl.group_size
  if rollout_size % cfg.rl.num_minibatches:
    raise ValueError(f'rl.num_prompts * rl.group_size = {rollout_size} does not split into '
                     f'rl.num_minibatches={cfg.rl.num_minibatches} equal minibatches')
  batches = {'rl': rollout_size // cfg.rl.num_minibatches}  # by config section
  if cfg.sft.max_steps > 0:  # sft.max_steps=0 (RL from a loaded model) never forms an SFT batch
    batches['sft'] = cfg.sft.batch_size
  micro = {}  # gradient accumulation: equal micro-batches, so their mean loss is the batch's
  for section, size in batches.items():
    k = cfg[section].grad_accum_steps
    if not isinstance(k, int) or k < 1 or size % k:
      raise ValueError(f'config.{section}.grad_accum_steps={k!r} must be a positive int that divides the '
                       f'{section} (mini)batch of {size}')
    micro[section] = size // k
  sizes = mesh_shape({a: cfg.mesh[a] for a in MESH_AXES}, num_devices)
  rules, _ = layout_rules(cfg)  # malformed config.sharding.* rules fail here, named
  data_parallel = math.prod(sizes[a] for a in rules.mesh_axes('batch'))
  checked = {'eval.batch_size': cfg.eval.batch_size,
             'rl.num_prompts': cfg.rl.num_prompts,  # the sampler shards prompts before the group repeat
             'rl minibatch': batches['rl'], 'rl rollout': rollout_size, 'rl micro-batch': micro['rl']}
  if 'sft' in batches:
    checked.update({'sft.batch_size': cfg.sft.batch_size, 'sft micro-batch': micro['sft']})
  for name, size in checked.items():
    if size % data_parallel:
      raise ValueError(f'{name}={size} is not divisible by the data-parallel mesh size {data_parallel}')


def parse_flags(argv: list[str], program: str) -> list[str]:
  """absl's flag parsing for a CLI (`app.run(main, flags_parser=...)`), but a bad --config.<key> override is one
  line naming `program`, not three chained tracebacks: for a key the config lacks, ml_collections raises a plain
  KeyError / AttributeError, and absl only reports flags.Error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, IndexError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(message))
      e = e.args[0]
    lines = str(e.args[0] if e.args else '').split('\n')
    # ConfigDict's message: "'key'", then, if a key is close, 'Did you mean "k" instead of "key"?'.
    key = lines[0][1:-1] if len(lines[0]) > 1 and lines[0][0] == lines[0][-1] == "'" else None
    better = lines[1].split('"')[1] if len(lines) > 1 and lines[1].startswith('Did you mean "') else None
    for arg in argv[1:]:
      if not arg.lstrip('-').startswith('config.'):
        continue
      path = arg.lstrip('-').split('=')[0].removeprefix('config.')
      if key in path.split('.'):
        hint = f' (did you mean {".".join(better if p == key else p for p in path.split("."))}?)' if better else ''
        raise SystemExit(f'{program}: unknown config key {path}{hint}') from None
      if path in lines[0]:  # config_path's "Attribute <class 'int'>.x does not exist ... lookup: rl.group_size.x"
        raise SystemExit(f'{program}: bad override --config.{path}: {lines[0]}') from None
    raise  # not about an override (a fault in the config file itself): then the traceback is the useful part
