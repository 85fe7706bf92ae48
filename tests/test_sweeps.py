"""The seed sweeps (grpo_jax.experiments.default_seeds, iterative_rl, prefix_credit) with a fake trainer: which runs
start, from which config and SFT copy, with which overrides in which order, what each appends to --out, and the
tables read back from those lines. No training: runs.train_process is replaced by a function that writes what a
finished run leaves."""
import json
import math
import os
import re

import pytest
from conftest import ROOT

from grpo_jax.experiments import default_seeds, iterative_rl, prefix_credit, runs

CONFIG = f'{ROOT}/configs/default.py'
TINY = f'{CONFIG}:tiny'
COMPLETION_LEN, CONTINUATION_TOKENS = 10.0, 30  # per GRPO step: the fake's sampled tokens


class FakeTrainer:
  """Records (config, workdir, args, whether the SFT stage was copied in) and leaves a finished run's files: a
  summary whose accuracies depend on the seed, SFT and GRPO metric rows, config.json and the SFT checkpoint folder."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir, args, log):
    copied = os.path.isdir(os.path.join(workdir, 'checkpoints', 'sft'))
    self.calls.append((config, os.path.relpath(workdir), list(args), copied))
    seed = int(next(a for a in args if a.startswith('--config.seed=')).split('=')[1])
    steps = int(next((a for a in reversed(args) if a.startswith('--config.rl.num_steps=')), '=2').split('=')[1])
    os.makedirs(os.path.join(workdir, 'checkpoints', 'sft'), exist_ok=True)
    summary = {'sft_accuracy': 0.25 + 0.125 * seed, 'rl_accuracy': 0.5 + 0.125 * seed, 'sft_reward': 0.1,
               'rl_reward': 0.2, 'rl_win_rate_vs_sft': 0.75, 'rl_sample': 'not kept'}
    rows = [{'stage': 'sft', 'step': 10, 'val_accuracy': 0.2}, {'stage': 'sft', 'step': 20, 'val_accuracy': 0.4}]
    rows += [{'stage': 'grpo', 'step': i + 1, 'entropy': 1.0 - 0.1 * i, 'frac_groups_no_signal': 0.5, 'pass_at_g': 0.5,
              'reward': 0.1 * i, 'completion_len': COMPLETION_LEN, 'prefix_continuation_tokens': CONTINUATION_TOKENS,
              'kl': 0.01, 'lr': 1e-5} for i in range(steps)]
    files = {'summary.json': json.dumps(summary), 'metrics.jsonl': ''.join(json.dumps(r) + '\n' for r in rows),
             'config.json': json.dumps({'rl': {'num_prompts': 4, 'group_size': 2}})}
    for name, text in files.items():
      with open(os.path.join(workdir, name), 'w') as f:
        f.write(text)
    with open(log, 'w') as f:
      f.write('fake\n')
    return 0, 12.0, 300.0


@pytest.fixture
def fake(monkeypatch, tmp_path):
  trainer = FakeTrainer()
  monkeypatch.setattr(runs, 'train_process', trainer)
  monkeypatch.chdir(tmp_path)  # workdirs are recorded relative to it
  return trainer


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_iterative_rl_variants_start_from_the_seeds_sft_and_the_overrides_win(fake, tmp_path, capsys):
  out = tmp_path / 'out.jsonl'
  iterative_rl.main(['prog', f'--config={TINY}', '--seeds=1', '--variants=I3,numbers_I1,numbers_I3', '--root=runs',
                     f'--out={out}', '--config.rl.num_steps=6'])
  configs, workdirs, args, copied = zip(*fake.calls, strict=True)
  # I1 runs first whenever an arithmetic variant is asked for: the others continue from its SFT stage.
  assert workdirs == ('runs/seed1/I1', 'runs/seed1/I3', 'runs/seed1/numbers_I1', 'runs/seed1/numbers_I3')
  assert configs == (TINY, TINY, f'{CONFIG}:numbers', f'{CONFIG}:numbers')
  assert copied == (False, True, False, True)
  assert args[0] == [*iterative_rl.REPORT, '--config.rl.num_steps=6', '--config.seed=1']  # after REPORT: it wins
  assert args[1] == [*iterative_rl.REPORT, '--config.rl.num_iterations=3', '--config.rl.num_steps=6',
                     '--config.seed=1', '--allow_config_change=rl,reward_model']
  assert args[3][:len(iterative_rl.NUMBERS)] == iterative_rl.NUMBERS
  lines = _lines(out)
  assert [r['variant'] for r in lines] == ['I1', 'I3', 'numbers_I1', 'numbers_I3']
  assert lines[1]['rl_accuracy'] == 0.625 and 'rl_sample' not in lines[1]
  assert lines[1]['traces']['reward'] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
  capsys.readouterr()
  iterative_rl.main(['prog', f'--table={out}'])
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith('| variant | seeds | SFT acc % | GRPO acc %')
  # I3, seed 1: SFT 37.5%, GRPO 62.5%, gain 25 points (min/mean/max of one seed).
  assert table[3].startswith('| I3 | 1 | 37.5/37.5/37.5 | 62.5/62.5/62.5 | 25.0/25.0/25.0 |')


def test_default_seeds_grpo_variants_continue_from_the_default_run(fake, tmp_path, capsys):
  out = tmp_path / 'out.jsonl'
  default_seeds.main(['prog', '--seeds=0,1', '--variants=default,sft_matched,lr_1e-4', '--root=runs', f'--out={out}'])
  configs, workdirs, args, copied = zip(*fake.calls, strict=True)
  assert workdirs == ('runs/seed0/default', 'runs/seed1/default', 'runs/seed0/sft_matched', 'runs/seed1/sft_matched',
                      'runs/seed0/lr_1e-4', 'runs/seed1/lr_1e-4')
  assert configs == (CONFIG, CONFIG, f'{CONFIG}:sft_matched', f'{CONFIG}:sft_matched', CONFIG, CONFIG)
  assert copied == (False, False, False, False, True, True)
  assert args[4] == ['--config.rl.lr=1e-4', '--config.seed=0', '--allow_config_change=rl,ppo']
  lines = {(r['variant'], r['seed']): r for r in _lines(out)}
  assert lines['default', 0]['sft_step_val_30'] == 20 and lines['default', 0]['entropy_first'] == 1.0
  # A line as the sweeps wrote them before the RL results were named rl_* (benchmarks/default_seeds.jsonl's).
  with open(out, 'a') as f:
    f.write(json.dumps({'variant': 'beta_0.04', 'seed': 3, 'status': 0, 'sft_accuracy': 0.25, 'grpo_accuracy': 0.875,
                        'wall_s': 60.0}) + '\n')
  capsys.readouterr()
  default_seeds.main(['prog', f'--table={out}'])
  table = capsys.readouterr().out
  # Seed 0: SFT 25%, GRPO 50%, the matched control (the fake's SFT accuracy) 25%: GRPO - matched = +25 points.
  assert '| 0 | 25.0 | 50.0 | +25.0 | 25.0 | +25.0 | 50.0 | 50.0 | 0.2 |' in table
  assert 'lr_1e-4 (seeds 0,1)' in table
  assert '| 3 | 25.0 | 87.5 | +62.5 | - | - | - | - | 1.0 |' in table


def test_prefix_credit_matches_the_outcome_run_to_the_prefix_runs_sampled_tokens(fake, tmp_path, capsys):
  out = tmp_path / 'out.jsonl'
  sft = tmp_path / 'sft' / 'seed2' / 'default'  # default_seeds' run of the seed, whose SFT stage each run copies
  (sft / 'checkpoints' / 'sft').mkdir(parents=True)
  (sft / 'metrics.jsonl').write_text(json.dumps({'stage': 'sft', 'step': 1}) + '\n')
  prefix_credit.main(['prog', '--seeds=2', '--steps=4', '--cuts=0.25,0.5', '--k=3', '--sft_root=sft', '--root=runs',
                      f'--out={out}', '--config.task.num_test=100'])
  _, workdirs, args, copied = zip(*fake.calls, strict=True)
  assert workdirs == ('runs/seed2/prefix', 'runs/seed2/outcome_matched', 'runs/seed2/outcome_steps')
  assert all(copied)
  assert args[0] == ['--config.task.num_test=100', '--config.seed=2', '--config.rl.num_steps=4',
                     '--allow_config_change=rl,ppo,task.num_test', '--config.rl.supervision=prefix_resample',
                     '--config.rl.prefix_cuts=(0.25,0.5,)', '--config.rl.prefix_continuations=3']
  # Per step the fake samples 10 tokens x 8 outputs and 30 continuation tokens: the matched run gets
  # ceil(4 x (80 + 30) / 80) = 6 steps.
  want = math.ceil(4 * (COMPLETION_LEN * 8 + CONTINUATION_TOKENS) / (COMPLETION_LEN * 8))
  assert '--config.rl.num_steps=6' in args[1] and want == 6
  assert '--config.rl.num_steps=4' in args[2] and not any('supervision' in a for a in args[2])
  assert [(r['variant'], r['steps']) for r in _lines(out)] == [('prefix', 4), ('outcome_matched', 6),
                                                              ('outcome_steps', 4)]
  assert '| outcome_matched | 2 | 6 |' in capsys.readouterr().out  # the table printed after the runs


@pytest.mark.parametrize('module, args, message', [
    (iterative_rl, ['--variants=I9'], "unknown variants ['I9']"),
    (default_seeds, ['--seeds=a'], '--seeds takes integers'),
    (prefix_credit, ['--variants=outcome_matched'], 'outcome_matched needs prefix'),
])
def test_bad_flags_are_one_line_naming_the_command(fake, module, args, message):
  with pytest.raises(SystemExit, match=re.escape(message)) as e:
    module.main(['prog', *args])
  assert str(e.value).startswith(f'python -m {module.__name__}: ')
  assert fake.calls == []
