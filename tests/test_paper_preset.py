"""configs/default.py:paper holds DeepSeekMath's GRPO choices (Shao et al. 2024) as its comments cite them, differs
from the default only in GRPO's rl fields, and passes the config checks."""
import pytest
from conftest import load_config

from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.config_checks import check_config

# The paper's value of each field, with where it says so (the preset's comments cite the same places).
PAPER = {
    'beta': 0.04,  # Sec. 4.2
    'kl_estimator': 'k3',  # Sec. 4.1.1, eq. 4
    'advantage': 'grpo',  # Sec. 4.1.2: group mean and std
    'loss_aggregation': 'sequence_mean',  # eq. 3: (1/G) sum_i (1/|o_i|) sum_t
    'importance_ratio': 'token',  # eq. 3
    'kl_in_reward': False,  # Sec. 4.1.1: the KL is in the loss
    'entropy_coef': 0.0,  # eq. 3
    'supervision': 'outcome',  # Sec. 4.1.2
    'num_epochs': 1,  # Sec. 4.2: a single update per exploration stage
    'num_minibatches': 1,
    'group_size': 64,  # Sec. 4.2: 64 outputs per question
    'clip_eps': 0.2, 'clip_eps_high': 0.0, 'dual_clip': 0.0,  # eq. 3's symmetric clip (0.2: not in the paper)
}


def test_the_paper_preset_holds_the_cited_values():
  cfg = load_config('paper')
  for key, value in PAPER.items():
    assert cfg.rl[key] == value, key
  assert cfg.rl.num_prompts * cfg.rl.group_size == 1024  # Sec. 4.2: training batch size 1024
  config = grpo.loss_config(cfg)
  assert (config.kl_estimator, config.kl_penalty, config.loss_aggregation, config.upper_clip_eps) == (
      'k3', True, 'sequence_mean', 0.2)
  check_config(cfg, 1)


def test_the_paper_preset_changes_only_grpo_fields():
  default, paper = load_config().to_dict(), load_config('paper').to_dict()
  assert {k: v for k, v in paper.items() if k != 'rl'} == {k: v for k, v in default.items() if k != 'rl'}
  changed = {k for k in default['rl'] if default['rl'][k] != paper['rl'][k]}
  assert changed == {'beta', 'group_size'}, changed  # the rest of the default already is the paper's
  assert paper['rl']['lr'] == default['rl']['lr'] != 1e-6  # kept, and said why in the preset's comment


def test_an_unknown_preset_lists_the_known_ones():
  with pytest.raises(ValueError, match=r'known: .*paper'):
    load_config('papers')
