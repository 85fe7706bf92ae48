"""checkpoint.save / read_meta / restore on a tiny tree, including a final save that lands on a saved step."""
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grpo_jax.pipeline import checkpoint


def _tree(value: float):
  return {'w': jnp.full((3, 2), value, jnp.float32), 'b': jnp.arange(4, dtype=jnp.int32)}


@pytest.mark.parametrize('keep', [1, 2])
def test_final_save_on_a_saved_step_replaces_only_the_meta(tmp_path, keep):
  mngr = checkpoint.manager(str(tmp_path), 'grpo', max_to_keep=keep)
  checkpoint.save(mngr, 2, {'state': _tree(1.0)}, {'step': 2, 'finished': False})
  checkpoint.save(mngr, 4, {'state': _tree(2.0)}, {'step': 4, 'finished': False})
  checkpoint.save(mngr, 4, {'state': _tree(2.0)}, {'step': 4, 'finished': True, 'summary': {'acc': 0.5}})
  assert mngr.all_steps() == ([4] if keep == 1 else [2, 4])
  assert checkpoint.read_meta(mngr) == {'step': 4, 'finished': True, 'summary': {'acc': 0.5}}
  restored = checkpoint.restore(mngr, 4, {'state': _tree(0.0)})
  np.testing.assert_array_equal(restored['state']['w'], np.full((3, 2), 2.0, np.float32))
  as_orbax_reads_it = mngr.restore(4, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  assert checkpoint.read_meta(checkpoint.manager(str(tmp_path), 'grpo', max_to_keep=keep)) == as_orbax_reads_it


def test_a_kill_during_the_final_save_keeps_the_checkpoint(tmp_path, monkeypatch):
  # With checkpoint_keep=1 the step being re-saved is the stage's only checkpoint: it must survive.
  mngr = checkpoint.manager(str(tmp_path), 'sft', max_to_keep=1)
  checkpoint.save(mngr, 6, {'state': _tree(3.0)}, {'step': 6, 'finished': False})

  def killed(*args):
    raise KeyboardInterrupt('killed mid-save')

  monkeypatch.setattr(os, 'replace', killed)  # the kill lands in whichever write the save does
  monkeypatch.setattr(mngr, 'save', killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(mngr, 6, {'state': _tree(3.0)}, {'step': 6, 'finished': True})
  monkeypatch.undo()
  fresh = checkpoint.manager(str(tmp_path), 'sft', max_to_keep=1)
  assert fresh.all_steps() == [6]
  assert checkpoint.read_meta(fresh) == {'step': 6, 'finished': False}
  restored = checkpoint.restore(fresh, 6, {'state': _tree(0.0)})
  np.testing.assert_array_equal(restored['state']['b'], np.arange(4))
