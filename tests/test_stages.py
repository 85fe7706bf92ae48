"""The stage table (pipeline/stages.py): folder names parse back to their stage, the RL stages and the policy's folders
come out in the order the readers need, old summaries read under rl_* keys, and every row's builder exists."""
import inspect

import pytest

from grpo_jax.pipeline import stages
from grpo_jax.pipeline.config_checks import ALGORITHMS
from grpo_jax.pipeline.stages import GRPO, PPO, REWARD_MODEL, SFT, Role


@pytest.mark.parametrize('folder,kind,iteration', [
    ('sft', SFT, None), ('grpo', GRPO, None), ('grpo_12', GRPO, 12), ('ppo', PPO, None),
    ('reward_model_0', REWARD_MODEL, 0),  # a name with an '_' in it is not read as stage 'reward' of 'model_0'
    ('sft_matched', None, None), ('grpox', None, None), ('broken-4', None, None), ('grpo_', None, None)])
def test_a_folder_parses_back_to_its_stage(folder, kind, iteration):
  assert stages.parse_folder(folder) == (None if kind is None else (kind, iteration))
  if kind is not None:
    assert kind.folder(iteration) == folder


def test_rl_stages_and_the_policy_folders_are_in_iteration_order():
  present = ['grpo_10', 'reward_model_1', 'grpo_2', 'sft', 'grpo_1', 'reward_model_0']
  assert stages.rl_folders(present) == ['grpo_1', 'grpo_2', 'grpo_10']  # by number, not as strings
  assert stages.rl_folders(['ppo', 'sft']) == ['ppo']
  assert stages.policy_folders(present) == ('grpo_10', 'grpo_2', 'grpo_1', 'grpo', 'ppo', 'sft')
  assert stages.policy_folders(['sft']) == ('grpo', 'ppo', 'sft')


def test_the_table_is_what_the_config_and_the_checkpoints_use():
  assert ALGORITHMS == stages.RL_ALGORITHMS == ('grpo', 'ppo')  # config.rl.algorithm names an RL stage
  assert stages.LORA_STAGES == ('sft', 'grpo')  # config.lora.stages: PPO and the reward model train every weight
  assert stages.rl_stage('ppo') is PPO
  with pytest.raises(ValueError, match=r"rl.algorithm='sft' is no RL stage"):
    stages.rl_stage('sft')
  # Checkpoint items keep the names they had as plain strings: checkpoints written before the enum load.
  assert [str(r) for r in Role] == ['policy', 'reference', 'reward_model', 'critic']
  assert {'policy': 1}[Role.POLICY] == 1 and f'{Role.CRITIC}' == 'critic'
  for kind in stages.STAGES.values():  # each builder is a make_stage-like function of its module
    module, _, function = kind.builder.partition(':')
    fn = getattr(__import__(module, fromlist=[function]), function)
    assert list(inspect.signature(fn).parameters)[0] == 'setup', kind.name


def test_old_summaries_read_with_rl_keys():
  old = {'rl_algorithm': 'ppo', 'sft_accuracy': 0.3, 'grpo_accuracy': 0.4, 'grpo_steps': 4,
         'grpo_vs_sft_mcnemar_p': 0.5, 'grpo_accuracy_ci': [0.3, 0.5], 'iterations': [{'stage': 'grpo'}]}
  assert stages.upgrade_summary(old) == {'rl_algorithm': 'ppo', 'sft_accuracy': 0.3, 'rl_accuracy': 0.4,
                                         'rl_steps': 4, 'rl_vs_sft_mcnemar_p': 0.5, 'rl_accuracy_ci': [0.3, 0.5],
                                         'iterations': [{'stage': 'grpo'}]}
  new = {'rl_accuracy': 0.4, 'sft_accuracy': 0.3}
  assert stages.upgrade_summary(new) == new
