"""A workdir saved before a knob existed resumes: the knob reads as the value that reproduces what the run did."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from grpo_jax.pipeline import workdir  # noqa: E402


def _saved_and_requested():
  requested = json.loads(default.get_config('tiny').to_json_best_effort())
  saved = json.loads(json.dumps(requested))
  del saved['rl']['policy_loss'], saved['decode_buckets']  # as a config.json written before they were added
  return saved, requested


def test_a_config_saved_before_the_knobs_existed_is_not_a_change():
  saved, requested = _saved_and_requested()
  assert workdir.config_changes(saved, requested) == {}


def test_a_real_change_of_an_added_knob_is_still_reported():
  saved, requested = _saved_and_requested()
  requested['rl']['policy_loss'] = 'other'
  assert workdir.config_changes(saved, requested) == {'rl.policy_loss': ('clip', 'other')}
