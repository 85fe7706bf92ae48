"""The stage loop knows no algorithm: any state of named trees, any number of stages, any names. Resume, early stop,
finished stages and the metrics file, on toy stages that train nothing."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.pipeline import checkpoint
from grpo_jax.pipeline.loop import Interrupt, Sinks, Stage, run_stage
from grpo_jax.pipeline.metrics import MetricWriter, read_metrics


def counter_stage(name: str, num_steps: int, *, stop_at: int | None = None, calls: list | None = None) -> Stage:
  """A stage whose state is two trees by role ('total' and 'scores', like a reward model's): step i adds i."""
  def step(state, i):
    if calls is not None:
      calls.append((name, i))
    total = state['total']['value'] + i
    return {'total': {'value': total}, 'scores': {'last': jnp.float32(i)}}, {'total': total, 'i': i}

  def finish(state):
    return {'final_total': float(state['total']['value'])}

  should_stop = (lambda m: m['i'] + 1 >= stop_at) if stop_at else (lambda m: False)  # noqa: E731
  return Stage(name, num_steps, {'total': {'value': jnp.int32(0)}, 'scores': {'last': jnp.float32(-1)}}, step, finish,
               should_stop, meta={'kind': 'counter'})


def sinks(workdir, **kw) -> Sinks:
  return Sinks(str(workdir), MetricWriter(str(workdir)), Interrupt(), log_every=1,
               checkpoint_every=kw.get('checkpoint_every', 2), checkpoint_keep=3)


def test_three_stages_of_any_name_run_in_sequence(tmp_path):
  s = sinks(tmp_path)
  summaries = [run_stage(counter_stage(name, n), s)[1] for name, n in (('rm_0', 3), ('policy_1', 4), ('rm_1', 2))]
  assert [x['final_total'] for x in summaries] == [0 + 1 + 2, 0 + 1 + 2 + 3, 0 + 1]
  assert [x['steps'] for x in summaries] == [3, 4, 2]
  rows = read_metrics(str(tmp_path))
  assert [(r['stage'], r['step']) for r in rows] == [('rm_0', 1), ('rm_0', 2), ('rm_0', 3), ('policy_1', 1),
                                                      ('policy_1', 2), ('policy_1', 3), ('policy_1', 4), ('rm_1', 1),
                                                      ('rm_1', 2)]
  meta = checkpoint.read_meta(checkpoint.manager(str(tmp_path), 'policy_1', max_to_keep=3))
  assert meta['finished'] and meta['kind'] == 'counter' and meta['summary']['final_total'] == 6


def test_resume_continues_from_the_last_checkpoint_and_rewinds_the_metrics(tmp_path):
  reference = tmp_path / 'ref'
  run_stage(counter_stage('a', 5), sinks(reference))
  # An interrupted run: 3 steps logged, the checkpoint at step 2, then a kill (step 3's row is on disk).
  workdir = tmp_path / 'w'
  calls = []
  with pytest.raises(RuntimeError):
    def dying_step(state, i):
      if i == 3:
        raise RuntimeError('killed')
      return counter_stage('a', 5, calls=calls).step(state, i)
    run_stage(counter_stage('a', 5)._replace(step=dying_step), sinks(workdir))
  assert [r['step'] for r in read_metrics(str(workdir))] == [1, 2, 3]
  state, summary = run_stage(counter_stage('a', 5, calls=calls), sinks(workdir))
  assert calls == [('a', 0), ('a', 1), ('a', 2), ('a', 2), ('a', 3), ('a', 4)]  # resumed from the step-2 checkpoint
  assert int(state['total']['value']) == 10 and summary['final_total'] == 10
  assert float(state['scores']['last']) == 4.0
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ('step_time', 'compiles')} for r in rows]  # noqa: E731
  assert strip(read_metrics(str(workdir))) == strip(read_metrics(str(reference)))


def test_a_finished_stage_is_restored_not_rerun(tmp_path):
  run_stage(counter_stage('a', 3), sinks(tmp_path))
  calls = []
  state, summary = run_stage(counter_stage('a', 3, calls=calls), sinks(tmp_path))
  assert calls == [] and int(state['total']['value']) == 3 and summary['final_total'] == 3


def test_should_stop_ends_the_stage_early_and_a_rerun_keeps_it_stopped(tmp_path):
  _, summary = run_stage(counter_stage('a', 10, stop_at=4), sinks(tmp_path, checkpoint_every=100))
  assert summary['steps'] == 4
  calls = []
  _, again = run_stage(counter_stage('a', 10, stop_at=4, calls=calls), sinks(tmp_path))
  assert calls == [] and again == summary


def test_checkpoint_items_are_the_state_roles(tmp_path):
  run_stage(counter_stage('a', 2), sinks(tmp_path))
  step_dir = tmp_path / 'checkpoints' / 'a' / '2'
  assert {'total', 'scores', 'meta'} <= {p.name for p in step_dir.iterdir()}
  restored = checkpoint.restore(checkpoint.manager(str(tmp_path), 'a', max_to_keep=3), 2,
                                counter_stage('a', 2).state)
  assert set(restored) == {'total', 'scores'}
  np.testing.assert_array_equal(restored['total']['value'], 1)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  reference = tmp_path / 'ref'
  run_stage(counter_stage('a', 6), sinks(reference))
  workdir = tmp_path / 'w'
  with pytest.raises(RuntimeError):
    def dying_step(state, i):
      if i == 4:
        raise RuntimeError('killed')
      return counter_stage('a', 6).step(state, i)
    run_stage(counter_stage('a', 6)._replace(step=dying_step), sinks(workdir))
  step_dir = workdir / 'checkpoints' / 'a' / '4'
  for f in (step_dir / 'total').rglob('*'):  # damage every array file of the newest checkpoint
    if f.is_file() and f.stat().st_size > 0 and 'METADATA' not in f.name and f.suffix != '.json':
      f.write_bytes(b'\0' * 3)
  state, summary = run_stage(counter_stage('a', 6), sinks(workdir))
  out = capsys.readouterr().out
  assert 'checkpoint step 4 is broken' in out and 'resuming from step 2' in out
  assert int(state['total']['value']) == 15 and summary['final_total'] == 15
  assert any(p.name.startswith('broken-4-') for p in (workdir / 'checkpoints' / 'a').iterdir())
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ('step_time', 'compiles')} for r in rows]  # noqa: E731
  assert strip(read_metrics(str(workdir))) == strip(read_metrics(str(reference)))


def test_a_signal_during_the_final_evaluation_stops_before_the_next_stage(tmp_path):
  import os
  import signal
  s = sinks(tmp_path)
  plain = counter_stage('a', 2)
  first = plain._replace(finish=lambda state: (os.kill(os.getpid(), signal.SIGTERM), plain.finish(state))[1])
  calls = []
  with pytest.raises(SystemExit, match='SIGTERM: a finished and saved'):
    run_stage(first, s)
    run_stage(counter_stage('b', 2, calls=calls), s)
  assert calls == []
  meta = checkpoint.read_meta(checkpoint.manager(str(tmp_path), 'a', max_to_keep=3))
  assert meta['finished']


# --- whether a stage trained: skipped updates and a collapse (loop.Health) ------------------------------------------


def scripted_stage(name: str, rows: list[dict]) -> Stage:
  """A stage whose step i reports rows[i] as its metrics (what a train step's guards would say) and trains nothing."""
  def step(state, i):
    return {'n': {'value': state['n']['value'] + 1}}, dict(rows[i])

  return Stage(name, len(rows), {'n': {'value': jnp.int32(0)}}, step, lambda state: {'final': 1})


def healthy(i: int) -> dict:
  return {'nonfinite': 0.0, 'grad_norm': 0.3 + 0.01 * i, 'entropy': 4.78 + 0.001 * i, 'frac_groups_no_signal': 0.25}


def test_a_healthy_stage_is_not_flagged(tmp_path, capsys):
  # A zero gradient on a step where no group had reward variance is no signal, not a collapse (beta = 0 runs have it).
  rows = [healthy(0), dict(healthy(1), grad_norm=0.0, frac_groups_no_signal=1.0), healthy(2),
          dict(healthy(3), grad_norm=0.0, frac_groups_no_signal=1.0), healthy(4)]
  _, summary = run_stage(scripted_stage('grpo', rows), sinks(tmp_path))
  assert summary['nonfinite_steps'] == 0 and summary['skipped_update_frac'] == 0.0
  assert summary['collapse_step'] is None and 'collapsed' not in capsys.readouterr().out


# Steps 1-2 healthy, from step 3 on dead. A zero gradient despite reward variance is dead at once (steps 3, 4: the
# collapse at 4); an entropy equal to the step before's first repeats at step 4 (steps 4, 5: the collapse at 5).
@pytest.mark.parametrize('dead,collapse', [({'grad_norm': 0.0}, 4), ({'entropy': 4.804}, 5)],
                         ids=['zero_grad', 'frozen_entropy'])
def test_a_collapse_is_named_at_the_step_it_happens(tmp_path, capsys, dead, collapse):
  rows = [healthy(0), healthy(1), *[dict(healthy(i), **dead) for i in range(2, 6)]]
  state, summary = run_stage(scripted_stage('grpo', rows), sinks(tmp_path))
  out = capsys.readouterr().out
  assert summary['collapse_step'] == collapse and out.count(f'WARNING: grpo: collapsed at step {collapse}') == 1, out
  assert out.count('collapsed') == 1  # named once, not on every dead step after
  assert int(state['n']['value']) == 6  # the stage runs to its end: a false alarm would cost a line, not the run
  meta = checkpoint.read_meta(checkpoint.manager(str(tmp_path), 'grpo', max_to_keep=3))
  assert meta['collapse_step'] == collapse and meta['summary']['collapse_step'] == collapse


def test_skipped_updates_are_counted_and_most_skipped_ends_the_stage(tmp_path):
  from grpo_jax.pipeline.loop import NotTrainedError
  # A quarter of one step's updates skipped: counted, not fatal.
  rows = [healthy(0), dict(healthy(1), nonfinite=0.25), healthy(2), healthy(3)]
  _, summary = run_stage(scripted_stage('a', rows), sinks(tmp_path / 'some'))
  assert summary['nonfinite_steps'] == 1 and summary['skipped_update_frac'] == pytest.approx(0.25 / 4)
  # Three of four steps skipped whole (fewer in a row than max_nonfinite_steps): the stage ends without a result.
  rows = [dict(healthy(i), nonfinite=1.0 if i != 1 else 0.0) for i in range(4)]
  finished = []
  stage = scripted_stage('b', rows)._replace(finish=lambda state: finished.append(1) or {})
  with pytest.raises(NotTrainedError, match=r'^b: 75% of its updates were skipped \(3 of 4 steps had a non-finite'):
    run_stage(stage, sinks(tmp_path / 'most'))
  assert finished == []  # no evaluation of a model that did not train
  meta = checkpoint.read_meta(checkpoint.manager(str(tmp_path / 'most'), 'b', max_to_keep=3))
  assert meta['step'] == 4 and not meta['finished'] and meta['nonfinite_steps'] == 3
  calls = []
  with pytest.raises(NotTrainedError, match='75% of its updates'):  # a rerun says so again, training nothing
    run_stage(stage._replace(step=lambda state, i: calls.append(i)), sinks(tmp_path / 'most'))
  assert calls == [] and finished == []


def test_a_finished_stage_from_before_the_counts_reads(tmp_path):
  # Checkpoints written before skipped updates and collapses were counted: their meta and summary lack the keys.
  run_stage(counter_stage('a', 2), sinks(tmp_path))
  mngr = checkpoint.manager(str(tmp_path), 'a', max_to_keep=3)
  meta = checkpoint.read_meta(mngr)
  old = {k: v for k, v in meta.items() if k not in ('skipped_updates', 'collapse_step')}
  old['summary'] = {k: v for k, v in meta['summary'].items() if k not in ('skipped_update_frac', 'collapse_step')}
  (tmp_path / 'checkpoints' / 'a' / '2' / 'meta' / 'metadata').write_text(json.dumps(old))
  _, summary = run_stage(counter_stage('a', 2), sinks(tmp_path))
  assert summary['final_total'] == 1 and summary['skipped_update_frac'] == 0.0 and summary['collapse_step'] is None
