"""grpo_jax.experiments: the FLOPs-matching rule, the paper table and the G sweep from fake workdirs (fast), the
orchestration with a fake trainer (what runs, with which arguments, and that a rerun skips finished runs), and one
real tiny paper_table run (slow)."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from matplotlib import image

from grpo_jax.experiments import group_size, paper_table, runs
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.pipeline.stats import wilson_counts

TINY = f'{ROOT}/configs/default.py:tiny'


def _forward_by_hand(m: ModelConfig, batch: int, tokens: int) -> float:
  """F(B, T, 0) of models/flops.py's docstring, written out: 2 FLOPs per multiply-add of every weight a token
  multiplies, plus 4 L n h per attended key, token i (1-based, causal) attending to i keys."""
  per_layer = m.d_model * m.num_heads * m.head_dim * 2 + m.d_model * m.num_kv_heads * m.head_dim * 2
  per_layer += 3 * m.d_model * m.mlp_dim
  n_mm = m.num_layers * per_layer + m.d_model * m.vocab_size
  keys = 0
  for i in range(1, tokens + 1):
    keys += i
  return batch * (2 * n_mm * tokens + 4 * m.num_layers * m.num_heads * m.head_dim * keys)


def test_sft_step_flops_and_matching_rule_by_hand():
  m = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  step = runs.sft_step_flops(m, batch_size=8, prompt_len=56, completion_len=40)
  assert step == pytest.approx(3 * _forward_by_hand(m, 8, 96), rel=1e-12)
  # E = round(F_rl / F_sft), halves up, at least one step.
  assert runs.matched_sft_steps(2.4 * step, step) == 2
  assert runs.matched_sft_steps(2.5 * step, step) == 3
  assert runs.matched_sft_steps(870.0 * step, step) == 870
  assert runs.matched_sft_steps(0.1 * step, step) == 1
  with pytest.raises(ValueError, match='step_flops > 0'):
    runs.matched_sft_steps(1.0, 0.0)
  with pytest.raises(ValueError, match='finite'):
    runs.matched_sft_steps(float('nan'), 1.0)


def test_config_sft_step_flops_uses_the_run_config(tiny_config):
  from grpo_jax.pipeline.setup import tokenizer_and_model_config
  _, m = tokenizer_and_model_config(tiny_config)
  want = 3 * _forward_by_hand(m, tiny_config.sft.batch_size, tiny_config.max_prompt_len + tiny_config.max_new_tokens)
  assert runs.config_sft_step_flops(tiny_config) == pytest.approx(want, rel=1e-12)


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def fake_workdir(workdir, *, stage, steps, correct, accuracy=None, sft_steps=6, flops_per_step=None, log_every=1,
                 status=0, wall=10.0, rss=500.0, extra_summary=None):
  """A workdir as a finished run leaves it, for the parts the experiments read: run.json, summary.json, the final
  checkpoint meta's per-problem scores, metrics.jsonl (model_flops on every log_every-th step) and config.json."""
  accuracy = float(np.mean(correct)) if accuracy is None else accuracy
  rl = stage != 'sft'
  summary = {'sft_accuracy': None if rl else accuracy, 'rl_accuracy': accuracy if rl else None,
             'sft_steps': steps if not rl else sft_steps, 'rl_steps': steps if rl else 0, **(extra_summary or {})}
  _write(os.path.join(workdir, 'run.json'), {'status': status, 'wall_s': wall, 'peak_rss_mb': rss, 'args': []})
  if status:
    return
  _write(os.path.join(workdir, 'summary.json'), summary)
  _write(os.path.join(workdir, 'checkpoints', stage, str(steps), 'meta', 'metadata'),
         {'summary': {'test_scores': [float(c) for c in correct]}})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i in range(1, steps + 1):
      if i % log_every == 0 or i == steps:
        row = {'stage': stage, 'step': i}
        if flops_per_step is not None:
          row['model_flops'] = flops_per_step(i)
        f.write(json.dumps(row) + '\n')


def _mcnemar_by_hand(a, b):
  """Exact two-sided McNemar: a binomial(n, 1/2) test on the discordant pairs, written out."""
  a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
  b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
  n = a_only + b_only
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


def test_table_from_fake_runs(tmp_path):
  rng = np.random.default_rng(0)
  step_flops = 1e6
  sft = {s: rng.random(40) < 0.4 for s in (0, 1)}
  grpo = {s: sft[s] | (rng.random(40) < 0.5) for s in (0, 1)}
  control = {s: sft[s] ^ (rng.random(40) < 0.1) for s in (0, 1)}
  records = []
  for s in (0, 1):
    base = tmp_path / f'seed{s}'
    fake_workdir(str(base / 'sft'), stage='sft', steps=6, correct=sft[s], wall=20 + s)
    fake_workdir(str(base / 'grpo'), stage='grpo', steps=4, correct=grpo[s], flops_per_step=lambda i: 1e6 * i,
                 log_every=1 if s == 0 else 2, wall=30 + s, rss=900 + s)
    fake_workdir(str(base / 'sft_matched'), stage='sft', steps=6 + 10, correct=control[s], wall=40)
    records += [paper_table.collect(paper_table.SFT, s, str(base / 'sft'), runs.finished(str(base / 'sft')),
                                    sft_step_flops=step_flops),
                paper_table.collect(paper_table.GRPO, s, str(base / 'grpo'), runs.finished(str(base / 'grpo')),
                                    sft_step_flops=step_flops),
                paper_table.collect(paper_table.PPO, s, str(base / 'ppo'), None, sft_step_flops=0,
                                    note='skipped: no preset'),
                paper_table.collect(paper_table.CONTROL, s, str(base / 'sft_matched'),
                                    runs.finished(str(base / 'sft_matched')), sft_step_flops=step_flops, sft_steps=6)]
  rows = {r['row']: r for r in paper_table.summarize(records)}
  assert list(rows) == list(paper_table.ROWS)
  for name, correct in ((paper_table.SFT, sft), (paper_table.GRPO, grpo), (paper_table.CONTROL, control)):
    r = rows[name]
    accs = [float(np.mean(correct[s])) for s in (0, 1)]
    assert r['seeds'] == [0, 1]
    assert r['accuracy_mean'] == pytest.approx(sum(accs) / 2)
    assert (r['accuracy_min'], r['accuracy_max']) == (pytest.approx(min(accs)), pytest.approx(max(accs)))
    k = sum(int(np.sum(correct[s])) for s in (0, 1))
    assert r['pooled_ci95'] == pytest.approx(list(wilson_counts(k, 80)))
    for seed_row in r['per_seed']:
      s = seed_row['seed']
      assert seed_row['ci95'] == pytest.approx(list(wilson_counts(int(np.sum(correct[s])), 40)))
      want = None if name == paper_table.SFT else _mcnemar_by_hand(correct[s], sft[s])
      assert seed_row['mcnemar_p_vs_sft'] == pytest.approx(want)
  # FLOPs: SFT 6 steps x 1e6; GRPO logged 1e6 * i at steps 1..4 (sum 1e7), or at steps 2 and 4 only (mean 3e6 x 4);
  # the control's 10 steps beyond the shared 6.
  assert [x['flops'] for x in rows[paper_table.SFT]['per_seed']] == [6e6, 6e6]
  assert [x['flops'] for x in rows[paper_table.GRPO]['per_seed']] == [pytest.approx(1e7), pytest.approx(1.2e7)]
  assert rows[paper_table.CONTROL]['flops_mean'] == pytest.approx(1e7)
  assert rows[paper_table.GRPO]['wall_s_mean'] == pytest.approx(30.5)
  assert rows[paper_table.GRPO]['peak_rss_mb_max'] == 901
  assert rows[paper_table.PPO]['accuracy_mean'] is None and rows[paper_table.PPO]['notes'] == [
      'seed 0: skipped: no preset', 'seed 1: skipped: no preset']
  table = paper_table.markdown(list(rows.values())).splitlines()
  assert [line.split(' | ')[0] for line in table[2:6]] == ['| SFT', '| GRPO', '| PPO', '| SFT compute-matched']
  assert len(table[0].split('|')) == len(table[3].split('|')) == 11
  assert table[-1] == '- PPO, seed 1: skipped: no preset'


def test_a_failed_run_is_a_note(tmp_path):
  wd = str(tmp_path / 'grpo')
  fake_workdir(wd, stage='grpo', steps=4, correct=[1, 0], status=1)
  with open(wd + '.log', 'w') as f:
    f.write('progress\ngrpo_jax.train: config.ppo.critic_warmup_steps=10 leaves none of rl.num_steps=4\n\n')
  run = json.load(open(os.path.join(wd, 'run.json')))
  assert runs.finished(wd) is None
  rec = paper_table.collect(paper_table.GRPO, 0, wd, run, sft_step_flops=1.0)
  assert rec['accuracy'] is None and rec['status'] == 1
  assert rec['note'].startswith('failed (exit status 1') and rec['note'].endswith('leaves none of rl.num_steps=4')
  quiet = str(tmp_path / 'ppo')  # finished, but its stage logged no FLOPs: the row says so
  fake_workdir(quiet, stage='ppo', steps=4, correct=[1, 0])
  rec = paper_table.collect(paper_table.PPO, 0, quiet, runs.finished(quiet), sft_step_flops=1.0)
  assert rec['accuracy'] == 0.5 and rec['flops'] is None and rec['note'] == 'its stage (ppo) logged no model_flops'


class FakeTrainer:
  """Stands in for runs.train_process: records each call and leaves a finished workdir whose numbers follow from
  the arguments (SFT-only when rl.num_steps=0, its steps sft.max_steps; an RL run logs model_flops per step)."""

  def __init__(self, rl_flops_per_step=3.3e8):
    self.calls = []
    self.rl_flops_per_step = rl_flops_per_step

  def __call__(self, config, workdir, args, log):
    self.calls.append((os.path.basename(workdir), list(args)))
    values = dict(a.removeprefix('--config.').split('=', 1) for a in args if a.startswith('--config.'))
    correct = np.arange(32) % (3 + int(values.get('seed', 0))) == 0
    if values.get('rl.num_steps') == '0' and values.get('sft.max_steps') == '0':  # the loaded model, evaluated
      fake_workdir(workdir, stage='sft', steps=0, correct=correct)
      shutil.rmtree(os.path.join(workdir, 'checkpoints'))
      _write(os.path.join(workdir, 'init_eval.json'), {'scores': correct.astype(float).tolist()})
    elif values.get('rl.num_steps') == '0':
      steps = int(values.get('sft.max_steps', 6))
      fake_workdir(workdir, stage='sft', steps=steps, correct=correct)
    else:
      stage = 'ppo' if values.get('rl.algorithm') == 'ppo' else 'grpo'
      fake_workdir(workdir, stage=stage, steps=int(values.get('rl.num_steps', 4)), correct=~correct,
                   flops_per_step=lambda i: self.rl_flops_per_step)
    _write(os.path.join(workdir, 'config.json'), {'rl': {'num_prompts': int(values.get('rl.num_prompts', 4)),
                                                         'group_size': int(values.get('rl.group_size', 4))}})
    with open(log, 'w') as f:
      f.write('fake\n')
    return 0, 1.5, 100.0


def test_paper_table_runs_each_row_and_resumes(tmp_path, monkeypatch, tiny_config):
  fake = FakeTrainer()
  monkeypatch.setattr(runs, 'train_process', fake)
  argv = ['paper_table', f'--config={TINY}', '--seeds=0,1', f'--root={tmp_path}', '--config.rl.lr=1e-4',
          '--config.ppo.critic_warmup_steps=1']
  rows = paper_table.main(argv)
  names = [name for name, _ in fake.calls]
  assert names == ['sft', 'grpo', 'ppo', 'sft_matched'] * 2
  sft_args, grpo_args, ppo_args, control_args = (args for _, args in fake.calls[:4])
  assert '--config.rl.num_steps=0' in sft_args and '--config.seed=0' in sft_args and '--config.rl.lr=0.0001' in sft_args
  assert '--allow_config_change=rl' in grpo_args and not any(a.startswith('--config.rl.num_steps') for a in grpo_args)
  # The PPO preset's changes first, the command line's after them (they win), then what may differ from SFT's config.
  assert ppo_args.index('--config.rl.algorithm=ppo') < ppo_args.index('--config.ppo.critic_warmup_steps=1')
  assert ppo_args[-1] == '--allow_config_change=ppo,rl'
  # Compute matching: 4 GRPO steps of 3.3e8 FLOPs against one SFT step's.
  extra = runs.matched_sft_steps(4 * 3.3e8, runs.config_sft_step_flops(tiny_config))
  assert f'--config.sft.max_steps={6 + extra}' in control_args and '--config.rl.num_steps=0' in control_args
  assert control_args[-1] == '--allow_config_change=sft.max_steps'
  assert os.path.exists(tmp_path / 'seed1' / 'sft_matched' / 'checkpoints' / 'sft' / '6')  # continued from SFT's copy
  assert [r['row'] for r in rows] == list(paper_table.ROWS)
  assert rows[3]['per_seed'][0]['steps'] == 6 + extra
  with open(tmp_path / 'paper_table.jsonl') as f:
    assert [json.loads(line)['row'] for line in f] == list(paper_table.ROWS)
  assert (tmp_path / 'paper_table.md').read_text().startswith('| | held-out acc %')

  fake.calls.clear()
  assert paper_table.main(argv) == rows  # every run finished: nothing trains again
  assert fake.calls == []
  os.remove(tmp_path / 'seed1' / 'ppo' / 'run.json')  # as if killed before it finished
  paper_table.main(argv)
  assert [name for name, _ in fake.calls] == ['ppo']


def test_paper_table_without_a_ppo_preset_skips_the_row(tmp_path, monkeypatch):
  fake = FakeTrainer()
  monkeypatch.setattr(runs, 'train_process', fake)
  rows = paper_table.main(['paper_table', f'--config={TINY}', '--seeds=0', f'--root={tmp_path}',
                           f'--ppo_preset={ROOT}/configs/default.py:no_such_preset', '--control=scratch'])
  assert [name for name, _ in fake.calls] == ['sft', 'grpo', 'sft_matched']
  assert rows[2]['row'] == 'PPO' and 'is not a preset' in rows[2]['notes'][0]
  assert not os.path.exists(tmp_path / 'seed0' / 'sft_matched' / 'checkpoints' / 'sft' / '6')  # from scratch


def test_paper_table_without_sft(tmp_path, monkeypatch):
  # RL straight from the loaded model (sft.max_steps=0, as configs/gsm8k_hf.py): the SFT row is that model's
  # evaluation, the RL runs start fresh (nothing to copy), and there is no SFT to continue for the control.
  fake = FakeTrainer()
  monkeypatch.setattr(runs, 'train_process', fake)
  rows = paper_table.main(['paper_table', f'--config={TINY}', '--seeds=0', f'--root={tmp_path}',
                           '--config.sft.max_steps=0', '--config.ppo.critic_warmup_steps=1'])
  assert [name for name, _ in fake.calls] == ['sft', 'grpo', 'ppo']
  assert not os.path.exists(tmp_path / 'seed0' / 'grpo' / 'checkpoints' / 'sft')
  sft_correct = np.arange(32) % 3 == 0
  assert rows[0]['accuracy_mean'] == pytest.approx(np.mean(sft_correct))
  assert rows[1]['per_seed'][0]['mcnemar_p_vs_sft'] == pytest.approx(_mcnemar_by_hand(~sft_correct, sft_correct))
  assert rows[3]['row'] == 'SFT compute-matched' and rows[3]['notes'] == [
      'seed 0: not run: no SFT stage to continue (sft.max_steps=0)']


@pytest.mark.parametrize('argv,match', [(['--config.rl.grup_size=3'], 'grup_size'), (['--seeds=a'], 'integers'),
                                        (['--config.rl.num_steps=0'], 'no RL stage'), (['extra'], 'unexpected')])
def test_paper_table_bad_flags(argv, match, tmp_path):
  with pytest.raises(SystemExit, match=match):
    paper_table.main(['paper_table', f'--config={TINY}', f'--root={tmp_path}', *argv])


def test_sweep_plan():
  plan = group_size.sweep_plan(16, 8, [2, 4, 8, 16, 32])
  assert [(p['setting'], p['group_size'], p['num_prompts']) for p in plan if p['setting'] == group_size.EQUAL_STEPS] \
      == [(group_size.EQUAL_STEPS, g, 16) for g in (2, 4, 8, 16, 32)]
  tokens = [p for p in plan if p['setting'] == group_size.EQUAL_TOKENS]
  assert [(p['group_size'], p['num_prompts'], p['exact']) for p in tokens] == [
      (2, 64, True), (4, 32, True), (8, 16, True), (16, 8, True), (32, 4, True)]
  # 4 x 4 = 16 completions: G=3 -> 16/3 = 5.33 -> 5; G=32 -> 0.5 -> 1 (halves up, at least one prompt); G=6 -> 2.67 -> 3
  tokens = [p for p in group_size.sweep_plan(4, 4, [3, 6, 32]) if p['setting'] == group_size.EQUAL_TOKENS]
  assert [(p['group_size'], p['num_prompts'], p['exact']) for p in tokens] == [(3, 5, False), (6, 3, False),
                                                                               (32, 1, False)]


def test_group_size_sweep_with_a_fake_trainer(tmp_path, monkeypatch):
  fake = FakeTrainer()
  monkeypatch.setattr(runs, 'train_process', fake)
  argv = ['group_size', f'--config={TINY}', '--seeds=0,1', f'--root={tmp_path}', '--group_sizes=2,4,8']
  rows = group_size.main(argv)
  # tiny: P=4, G0=4 (16 completions per step): equal tokens gives P = 8, 4, 2; G=4 is the same run for both.
  assert [name for name, _ in fake.calls] == ['sft', 'G2_P4', 'G2_P8', 'G4_P4', 'G8_P4', 'G8_P2'] * 2
  assert ['--config.rl.group_size=8', '--config.rl.num_prompts=2'] == [
      a for a in fake.calls[5][1] if a.startswith(('--config.rl.group_size', '--config.rl.num_prompts'))]
  assert [(r['setting'], r['group_size'], r['completions_per_step']) for r in rows] == [
      (group_size.EQUAL_STEPS, 2, 8), (group_size.EQUAL_TOKENS, 2, 16), (group_size.EQUAL_STEPS, 4, 16),
      (group_size.EQUAL_TOKENS, 4, 16), (group_size.EQUAL_STEPS, 8, 32), (group_size.EQUAL_TOKENS, 8, 16)]
  # The fake's GRPO solves what SFT missed: problem i unless i % (3 + seed) == 0.
  accs = [1 - np.mean(np.arange(32) % (3 + s) == 0) for s in (0, 1)]
  assert rows[0]['accuracy_mean'] == pytest.approx(np.mean(accs))
  assert (rows[0]['accuracy_min'], rows[0]['accuracy_max']) == (pytest.approx(min(accs)), pytest.approx(max(accs)))
  solved = sum(int(np.sum(np.arange(32) % (3 + s) != 0)) for s in (0, 1))
  assert rows[0]['pooled_ci95'] == pytest.approx(list(wilson_counts(solved, 64)))
  with open(tmp_path / 'group_size.jsonl') as f:
    assert len(f.readlines()) == 6
  png = image.imread(tmp_path / 'group_size.png')
  assert png.shape[0] > 100 and png.shape[1] > 100
  fake.calls.clear()
  group_size.main(argv)
  assert fake.calls == []


@pytest.mark.slow
def test_paper_table_end_to_end_tiny(tmp_path):
  # The real thing on the tiny preset, one seed: four training processes, then a rerun that trains nothing.
  cmd = [sys.executable, '-m', 'grpo_jax.experiments.paper_table', f'--config={TINY}', '--seeds=0',
         f'--root={tmp_path}', '--config.ppo.critic_warmup_steps=1']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'paper_table.jsonl') as f:
    rows = {r['row']: r for r in map(json.loads, f)}
  assert list(rows) == list(paper_table.ROWS)
  for r in rows.values():
    assert r['seeds'] == [0], r['notes']
    seed = r['per_seed'][0]
    assert 0 <= seed['ci95'][0] <= seed['accuracy'] <= seed['ci95'][1] <= 1
    assert seed['wall_s'] > 0 and seed['peak_rss_mb'] > 0
    assert r['row'] == 'SFT' or 0 <= seed['mcnemar_p_vs_sft'] <= 1
  assert rows['SFT']['per_seed'][0]['steps'] == 6
  grpo_flops = rows['GRPO']['per_seed'][0]['flops']
  step = rows['SFT']['per_seed'][0]['flops'] / 6
  assert rows['SFT compute-matched']['per_seed'][0]['steps'] == 6 + runs.matched_sft_steps(grpo_flops, step)
  mtimes = {p: os.path.getmtime(p) for p in tmp_path.glob('seed0/*/run.json')}
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and 'training' not in again.stdout
  assert {p: os.path.getmtime(p) for p in tmp_path.glob('seed0/*/run.json')} == mtimes
