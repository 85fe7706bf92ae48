"""The trainer's stages by name and the models they hold by role: the one table that run.py, checkpoint.py,
evaluate.py, report.py and experiments/runs.py read, instead of each spelling stage names.

A run chains them (run.py): sft -> [reward_model_0] -> grpo_1 -> [reward_model_1] -> grpo_2 -> ..., or sft -> ppo.
A stage's checkpoint folder (<workdir>/checkpoints/<folder>), the 'stage' of its metric rows and the word
config.lora.stages takes are its name; a stage that runs once per outer iteration k names its folder '<name>_<k>'
(GRPO's single iteration is plain 'grpo'). Each folder holds its models by `Role`, one Orbax item each.

Adding a stage: its module (pipeline/<name>.py, whose make_stage returns a loop.Stage), a row in STAGES here, and
its place in run.py's sequence. Nothing else spells its name: checkpoints, LoRA, evaluation and the plots read it
from this table.

The RL stage (GRPO or PPO, config.rl.algorithm) reports its results in summary.json as rl_* keys; results written
before that said grpo_*, and `upgrade_summary` renames them for any reader of old files.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import re
from collections.abc import Iterable, Mapping
from typing import Any


class Role(enum.StrEnum):
  """A model a stage's checkpoint holds, named by what it does; the value is its Orbax item on disk, so checkpoints
  written when these were plain strings load as they are."""
  POLICY = 'policy'  # the trained policy's TrainState (step, params, optimizer state)
  REFERENCE = 'reference'  # pi_ref's frozen params (the KL term); absent with LoRA (the policy's frozen base)
  REWARD_MODEL = 'reward_model'  # the learned reward model's TrainState (iterative RL, Alg. 1)
  CRITIC = 'critic'  # PPO's value model's TrainState


@dataclasses.dataclass(frozen=True)
class StageKind:
  """One row of the stage table."""
  name: str  # checkpoint folder, metric rows' 'stage', config.lora.stages' word
  builder: str  # 'module:function' returning its loop.Stage; imported on use (stage modules import this table)
  rl: bool  # an RL stage: one of config.rl.algorithm's values, its results summary.json's rl_* keys
  lora: bool  # may train LoRA adapters (config.lora.stages lists it); else every weight
  roles: tuple[Role, ...]  # the models its checkpoints hold

  def build(self, *args: Any, **kwargs: Any):
    """The stage's loop.Stage from its module's builder (the arguments are that builder's)."""
    module, _, function = self.builder.partition(':')
    return getattr(importlib.import_module(module), function)(*args, **kwargs)

  def folder(self, iteration: int | None = None) -> str:
    """The checkpoint folder of the stage, or of its run in outer iteration `iteration` ('<name>_<k>')."""
    return self.name if iteration is None else f'{self.name}_{iteration}'


SFT = StageKind('sft', 'grpo_jax.pipeline.sft:make_stage', rl=False, lora=True, roles=(Role.POLICY,))
REWARD_MODEL = StageKind('reward_model', 'grpo_jax.pipeline.reward_model:make_stage', rl=False, lora=False,
                         roles=(Role.REWARD_MODEL,))
GRPO = StageKind('grpo', 'grpo_jax.pipeline.grpo:make_stage', rl=True, lora=True, roles=(Role.POLICY, Role.REFERENCE))
PPO = StageKind('ppo', 'grpo_jax.pipeline.ppo:make_stage', rl=True, lora=False,
                roles=(Role.POLICY, Role.REFERENCE, Role.CRITIC))
STAGES: dict[str, StageKind] = {s.name: s for s in (SFT, REWARD_MODEL, GRPO, PPO)}  # in the order a run meets them

RL_ALGORITHMS = tuple(s.name for s in STAGES.values() if s.rl)  # config.rl.algorithm's values
LORA_STAGES = tuple(s.name for s in STAGES.values() if s.lora)  # config.lora.stages' words
# Names with an '_' in them first, so 'reward_model_0' is not read as a stage 'reward' of iteration 'model_0'.
_FOLDER = re.compile(rf"({'|'.join(sorted(STAGES, key=len, reverse=True))})(?:_(\d+))?")


def rl_stage(algorithm: str) -> StageKind:
  """The RL stage config.rl.algorithm names (config_checks has refused other values)."""
  if algorithm not in RL_ALGORITHMS:
    raise ValueError(f'rl.algorithm={algorithm!r} is no RL stage; known: {list(RL_ALGORITHMS)}')
  return STAGES[algorithm]


def parse_folder(folder: str) -> tuple[StageKind, int | None] | None:
  """(stage, outer iteration or None) of a checkpoint folder or metric rows' 'stage' ('grpo_2' -> (GRPO, 2));
  None for a name no stage has."""
  match = _FOLDER.fullmatch(folder)
  if match is None:
    return None
  return STAGES[match.group(1)], None if match.group(2) is None else int(match.group(2))


def kind_of(folder: str) -> StageKind | None:
  """The stage a checkpoint folder or metric row's 'stage' belongs to; None for a name no stage has."""
  parsed = parse_folder(folder)
  return None if parsed is None else parsed[0]


def is_rl(folder: str) -> bool:
  """Whether a folder or metric row's 'stage' is an RL stage's (GRPO's, any iteration, or PPO's)."""
  kind = kind_of(folder)
  return kind is not None and kind.rl


def rl_folders(folders: Iterable[str]) -> list[str]:
  """The RL stages among `folders`, outer iterations in order (a plain 'grpo' or 'ppo' is iteration 1)."""
  found = [(parse_folder(f)[1] or 1, f) for f in folders if is_rl(f)]
  return [f for _, f in sorted(found)]


def policy_folders(present: Iterable[str]) -> tuple[str, ...]:
  """The folders to read a workdir's final policy from, in order of preference: the RL stages' numbered iterations
  found in `present`, the last first, then every RL stage's plain folder, then SFT's (absent ones are skipped by the
  reader)."""
  numbered = sorted(((it, f) for f in present if (p := parse_folder(f)) and p[0].rl and (it := p[1]) is not None),
                    reverse=True)
  return (*[f for _, f in numbered], *RL_ALGORITHMS, SFT.name)


# summary.json's RL results as written before they were named rl_* (PPO's too were called grpo_*).
_OLD_SUMMARY_KEYS = {f'grpo_{k}': f'rl_{k}' for k in (
    'accuracy', 'reward', 'steps', 'wall_time', 'sample', 'win_rate_vs_sft', 'frac_groups_no_signal', 'pass_at_g',
    'accuracy_ci')} | {'grpo_vs_sft_mcnemar_p': 'rl_vs_sft_mcnemar_p'}


def upgrade_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
  """A summary.json (or a result row that copied one) with the RL stage's old grpo_* keys renamed to rl_*; every
  other key, and a row already written with rl_* keys, unchanged."""
  return {(_OLD_SUMMARY_KEYS[k] if k in _OLD_SUMMARY_KEYS and _OLD_SUMMARY_KEYS[k] not in summary else k): v
          for k, v in summary.items()}

