"""Tests for grpo_jax.pipeline.config_checks.check_config on configs/default.py and bad overrides of it."""
import importlib.util
import pathlib
import re

import pytest

from grpo_jax.pipeline.config_checks import check_config

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'


def _load_config_module():
  spec = importlib.util.spec_from_file_location('grpo_default_config', CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_CONFIGS = _load_config_module()


def _get(preset):
  return _CONFIGS.get_config(preset)


def _set(cfg, path, value):
  *parents, leaf = path.split('.')
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize('preset', [None, 'tiny'])
def test_presets_pass(preset):
  cfg = _get(preset)
  check_config(cfg, 1)


def test_presets_differ_and_unknown_preset_raises():
  assert _get('tiny').task.num_train < _get(None).task.num_train
  with pytest.raises(ValueError, match='unknown preset'):
    _get('huge')


@pytest.mark.parametrize('preset', [None, 'tiny'])
def test_presets_pass_on_two_devices(preset):
  # Every batch size of both presets is even, so a 2-way data-parallel mesh is fine too.
  check_config(_get(preset), 2)


# (config path, bad value, regex the error must match: it names the offending key)
BAD_VALUES = [
    ('rl.group_size', 1, r'config\.rl\.group_size'),
    ('rl.group_size', 0, r'config\.rl\.group_size'),
    ('rl.num_prompts', 0, r'config\.rl\.num_prompts'),
    ('sft.batch_size', -1, r'config\.sft\.batch_size'),
    ('rl.clip_eps', 0.0, r'config\.rl\.clip_eps'),
    ('rl.clip_eps', 1.0, r'config\.rl\.clip_eps'),
    ('rl.beta', -1.0, r'config\.rl\.beta'),
    ('rl.reward', 'nope', r"config\.rl\.reward='nope'"),
    ('rl.kl_estimator', 'k9', r"config\.rl\.kl_estimator='k9'"),
    ('rl.advantage', 'ppo', r"config\.rl\.advantage='ppo'"),
    ('rl.top_p', 0.0, r'config\.rl\.top_p'),
    ('rl.top_k', -1, r'top_k'),
    ('rl.lr', 0.0, r'config\.rl\.lr'),
    ('rl.temperature', 0.0, r'config\.rl\.temperature'),
    ('sft.target_accuracy', 1.5, r'config\.sft\.target_accuracy'),
    ('task.name', 'gsm8k', r"config\.task\.name='gsm8k' needs a tokenizer"),  # no model.path
    ('task.name', 'nope', r"config\.task\.name='nope' is unknown"),
    ('task.prompt_template', 'nope', r"prompt template 'nope'"),
    ('task.chat', 'sometimes', r"config\.task\.chat='sometimes'"),
    ('task.verifier', 'nope', r"config\.task\.verifier='nope'"),
    ('sft.max_steps', -1, r'config\.sft\.max_steps'),
    ('max_new_tokens', 0, r'config\.max_new_tokens'),
    ('decode_block', -1, r'config\.decode_block'),
    ('compile_cache_dir', __file__, r'config\.compile_cache_dir=.* is not a directory'),
    ('mesh.data', 3, r"mesh .*'data': 3"),
]


@pytest.mark.parametrize('preset', [None, 'tiny'])
@pytest.mark.parametrize('path,value,pattern', BAD_VALUES, ids=[f'{p}={v}' for p, v, _ in BAD_VALUES])
def test_bad_value_raises_naming_key(preset, path, value, pattern):
  cfg = _get(preset)
  _set(cfg, path, value)
  with pytest.raises(ValueError, match=pattern):
    check_config(cfg, 1)


@pytest.mark.parametrize('preset', [None, 'tiny'])
def test_minibatches_must_divide_rollout(preset):
  cfg = _get(preset)
  rollout = cfg.rl.num_prompts * cfg.rl.group_size
  bad = next(m for m in range(2, rollout) if rollout % m)
  cfg.rl.num_minibatches = bad
  with pytest.raises(ValueError, match=rf'rl\.num_minibatches={bad}'):
    check_config(cfg, 1)
  cfg.rl.num_minibatches = rollout  # a divisor (one example per minibatch) is fine
  cfg.rl.shared_prompt = False  # (with it on, minibatches hold whole groups: tests/test_shared_prompt.py)
  check_config(cfg, 1)


def test_batch_sizes_must_divide_data_parallel_mesh():
  cfg = _get('tiny')
  cfg.sft.batch_size = 3
  check_config(cfg, 1)  # fine on one device
  with pytest.raises(ValueError, match=r'sft\.batch_size=3 .*data-parallel mesh size 2'):
    check_config(cfg, 2)
  cfg = _get('tiny')
  cfg.eval.batch_size = 15
  with pytest.raises(ValueError, match=r'eval\.batch_size=15'):
    check_config(cfg, 2)
  # With the devices on the tensor axis instead, data parallelism is 1 and the odd batch is fine.
  cfg.mesh.data, cfg.mesh.tensor = 1, 2
  check_config(cfg, 2)


def test_mesh_must_fit_devices():
  cfg = _get('tiny')  # every tiny batch size is divisible by 4
  cfg.mesh.data, cfg.mesh.fsdp = 2, -1
  check_config(cfg, 4)  # data 2 x fsdp 2
  with pytest.raises(ValueError, match=re.escape("'data': 2")):
    check_config(cfg, 3)
  cfg.mesh.data, cfg.mesh.fsdp = -1, -1
  with pytest.raises(ValueError, match='at most one -1'):
    check_config(cfg, 1)


def test_first_bad_knob_is_reported():
  cfg = _get(None)
  cfg.rl.group_size = 1
  cfg.rl.kl_estimator = 'k9'
  with pytest.raises(ValueError, match='group_size'):
    check_config(cfg, 1)
  cfg.rl.group_size = 8
  with pytest.raises(ValueError, match='kl_estimator'):
    check_config(cfg, 1)


def _load(name):
  spec = importlib.util.spec_from_file_location(f'grpo_{name}_config', CONFIG_PATH.parent / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('name', ['gsm8k_hf', 'deepseekmath_7b'])
@pytest.mark.parametrize('preset', [None, 'tiny'])
def test_hf_configs_need_a_model_dir_then_pass(name, preset, tmp_path):
  cfg = _load(name).get_config(preset)
  with pytest.raises(ValueError, match='config.model.path'):
    check_config(cfg, 1)
  cfg.model.path = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    check_config(cfg, 1)
  cfg.model.path = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    check_config(cfg, 1)
  (tmp_path / 'config.json').write_text('{}')
  check_config(cfg, 1)


def test_paper_hyperparameters_in_gsm8k_hf():
  rl = _load('gsm8k_hf').get_config().rl
  assert (rl.lr, rl.beta, rl.group_size, rl.num_epochs, rl.num_prompts * rl.group_size) == (1e-6, 0.04, 64, 1, 1024)
  assert _load('gsm8k_hf').get_config().max_new_tokens == 1024


def test_jsonl_task_files_must_exist(tmp_path):
  cfg = _load('gsm8k_hf').get_config('tiny')
  (tmp_path / 'config.json').write_text('{}')
  cfg.model.path, cfg.task.name = str(tmp_path), 'jsonl'
  cfg.task.train_file = str(tmp_path / 'train.jsonl')
  with pytest.raises(FileNotFoundError, match=r'config\.task\.train_file'):
    check_config(cfg, 1)


@pytest.mark.parametrize('overrides, match', [
    (dict(kl_target=-0.1), 'kl_target must be >= 0'),
    (dict(kl_horizon=0), 'kl_horizon > 0'),
    (dict(kl_target=0.01, beta=0.0), r"kl_target=0.01 with rl.kl_adapt='beta' needs config.rl.beta > 0"),
])
def test_kl_controller_settings_are_checked(overrides, match):
  cfg = _get('tiny')
  cfg.rl.update(overrides)
  with pytest.raises(ValueError, match=match):
    check_config(cfg, 1)


# The loss switches (core/losses.LossConfig): (overrides, regex of the error). Each fails in check_config, which
# runs before anything is built or compiled.
BAD_LOSS_SWITCHES = [
    (dict(loss_aggregation='mean'), r"config\.rl\.loss_aggregation='mean' is unknown; known: \['constant', "
                                    r"'sequence_mean', 'sequence_sum', 'token_mean'\]"),
    (dict(importance_ratio='seq'), r"config\.rl\.importance_ratio='seq' is unknown; known: \['sequence', 'token'\]"),
    (dict(kl_estimator='k4'), r"config\.rl\.kl_estimator='k4' is unknown; known: \['exact', 'k1', 'k2', 'k3', "
                              r"'k3_k2grad'\]"),
    (dict(advantage='std'), r"config\.rl\.advantage='std' is unknown; known: \['batch_std', 'group_mean', 'grpo'\]"),
    (dict(clip_eps=0.2, clip_eps_high=0.1), r'config\.rl\.clip_eps_high=0\.1 must be 0 .* >= rl\.clip_eps=0\.2'),
    (dict(clip_eps_high=-0.1), r'config\.rl\.clip_eps_high=-0\.1'),
    (dict(dual_clip=1.0), r'config\.rl\.dual_clip=1\.0 must be 0 \(off\) or > 1'),
    (dict(dual_clip=0.5), r'config\.rl\.dual_clip=0\.5 must be 0 \(off\) or > 1'),
    (dict(dual_clip=-2.0), r'config\.rl\.dual_clip=-2\.0'),
    (dict(kl_in_reward=True, beta=0.0), r'config\.rl\.kl_in_reward=True with rl\.beta=0'),
    (dict(kl_in_reward='yes'), r'config\.rl\.kl_in_reward must be True or False'),
    (dict(entropy_coef='0.01'), r'config\.rl\.entropy_coef must be a number'),
    (dict(importance_ratio='sequence', supervision='process'),
     r"config\.rl\.importance_ratio='sequence' \(GSPO\) with rl\.supervision='process' is unsupported"),
]


@pytest.mark.parametrize('overrides, match', BAD_LOSS_SWITCHES,
                         ids=['-'.join(f'{k}={v}' for k, v in o.items()) for o, _ in BAD_LOSS_SWITCHES])
def test_bad_loss_switches_raise_naming_the_key(overrides, match):
  cfg = _get('tiny')
  for key, value in overrides.items():
    if isinstance(value, str) != isinstance(cfg.rl[key], str) or isinstance(value, bool) != isinstance(
        cfg.rl[key], bool):
      # ConfigDict keeps a field's type: a wrongly typed value needs the field replaced.
      del cfg.rl[key]
    cfg.rl[key] = value
  with pytest.raises(ValueError, match=match):
    check_config(cfg, 1)


@pytest.mark.parametrize('overrides', [
    dict(loss_aggregation='token_mean'), dict(loss_aggregation='constant'), dict(loss_aggregation='sequence_sum'),
    dict(clip_eps_high=0.28), dict(clip_eps_high=0.2), dict(dual_clip=3.0), dict(importance_ratio='sequence'),
    dict(kl_in_reward=True, beta=0.04), dict(kl_estimator='k3_k2grad'), dict(entropy_coef=0.001),
    dict(advantage='batch_std'),
])
def test_good_loss_switches_pass_and_reach_the_loss_config(overrides):
  from grpo_jax.pipeline.grpo import loss_config
  cfg = _get('tiny')
  cfg.rl.update(overrides)
  check_config(cfg, 1)
  config = loss_config(cfg)
  for key, value in overrides.items():
    if key not in ('beta', 'advantage'):
      assert getattr(config, key) == value, key
