"""The loss's registries (core/losses.POLICY_LOSSES, IMPORTANCE_RATIOS, LOSS_AGGREGATIONS): the run config accepts
exactly their names, through the one function that builds the loss from the config (pipeline/grpo.loss_config); an
unknown name fails in one line listing the known ones; and a loss added to a registry alone is selected by its name
and computed, a per-output reduction (a geometric mean of each output's ratios, GMPO's kind) included."""
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from grpo_jax.core import losses
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.grpo import loss_config

# config.rl key -> the registry whose names it takes
REGISTRIES = {'policy_loss': losses.POLICY_LOSSES, 'importance_ratio': losses.IMPORTANCE_RATIOS,
              'loss_aggregation': losses.LOSS_AGGREGATIONS}


def _batch(seed=0, n=4, t=6):
  """[n, t] logprobs near each other, one advantage per output [n], and right-padded masks of lengths 6, 4, 1, 3."""
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, (n, t)).astype(np.float32)
  lp = (old + rng.normal(0.0, 0.2, (n, t))).astype(np.float32)
  mask = (np.arange(t)[None] < np.array([6, 4, 1, 3])[:, None]).astype(np.float32)
  return lp, old, old.copy(), np.array([1.0, -0.5, 2.0, -1.5], np.float32), mask


@pytest.mark.parametrize('key', sorted(REGISTRIES))
def test_the_config_accepts_every_registered_name(key):
  for name in REGISTRIES[key]:
    cfg = load_config('tiny')
    cfg.rl[key] = name
    check_config(cfg, 1)
    assert getattr(loss_config(cfg), key) == name


@pytest.mark.parametrize('key', sorted(REGISTRIES))
def test_an_unknown_name_fails_in_one_line_listing_the_known_ones(key):
  cfg = load_config('tiny')
  cfg.rl[key] = 'nope'
  with pytest.raises(ValueError) as error:
    check_config(cfg, 1)
  # The config key, the value, and the registry's names sorted: nothing else is accepted.
  assert str(error.value) == f"config.rl.{key}='nope' is unknown; known: {sorted(REGISTRIES[key])}"
  with pytest.raises(ValueError, match=f"^{key}='nope' is unknown; known: "):
    losses.LossConfig(**{key: 'nope'})


def test_a_loss_config_error_names_the_config_keys():
  cfg = load_config('tiny')
  cfg.rl.clip_eps, cfg.rl.clip_eps_high = 0.2, 0.1
  with pytest.raises(ValueError) as error:
    loss_config(cfg)
  assert str(error.value) == ('config.rl.clip_eps_high=0.1 must be 0 (= rl.clip_eps, a symmetric clip) or >= '
                              'rl.clip_eps=0.2 (the lower epsilon)')
  cfg = load_config('tiny')
  cfg.rl.kl_estimator, cfg.rl.beta = 'exact', 0.0
  with pytest.raises(ValueError) as error:
    loss_config(cfg)
  assert str(error.value) == ("config.rl.kl_estimator='exact' is the loss's KL term: it needs rl.beta > 0, and "
                              'neither rl.kl_in_reward nor rl.trainer_sampling_filters')


def _geometric_mean_objective(log_ratio, advantages, mask, *, clip_eps, clip_eps_high, dual_clip=0.0):
  """A test loss with a per-output reduction: exp(mean over the output's tokens of the log ratio clipped to
  [-eps, eps_high]) * A, the same value on every token of the output (GMPO's shape, without its sign rule)."""
  del dual_clip
  clipped = jnp.clip(log_ratio, -clip_eps, clip_eps_high)
  mean = (clipped * mask).sum(-1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  return jnp.broadcast_to(jnp.exp(mean) * advantages, log_ratio.shape), {'clipped_frac': clipped != log_ratio}


def test_a_registered_loss_is_selected_by_name_alone(monkeypatch):
  """An entry in POLICY_LOSSES is all a new loss needs: the config accepts its name, the LossConfig carries it, and
  grpo_loss computes it; here one whose objective is per output, checked against numpy."""
  monkeypatch.setitem(losses.POLICY_LOSSES, 'geometric_mean', _geometric_mean_objective)
  cfg = load_config('tiny')
  cfg.rl.policy_loss = 'geometric_mean'
  check_config(cfg, 1)
  assert loss_config(cfg).policy_loss == 'geometric_mean'

  lp, old, ref, adv, mask = _batch()
  eps = 0.1
  loss, metrics = losses.grpo_loss(*map(jnp.asarray, (lp, old, ref, adv, mask)), policy_loss='geometric_mean',
                                   clip_eps=eps, beta=0.0)
  log_ratio = np.clip(lp.astype(np.float64) - old, -eps, eps)
  lengths = mask.sum(-1)
  per_output = np.exp((log_ratio * mask).sum(-1) / lengths) * adv  # every length here is >= 1
  np.testing.assert_allclose(float(loss), -per_output.mean(), rtol=1e-5)  # 'sequence_mean' of a per-output value
  clipped = (np.abs(lp.astype(np.float64) - old) > eps) & (mask > 0)
  np.testing.assert_allclose(float(metrics['clipped_frac']), clipped.sum() / mask.sum(), rtol=1e-6)
  assert 'clip_frac' not in metrics  # the flags are the loss's own


def test_the_clip_loss_is_the_default_and_its_flags_are_logged():
  lp, old, ref, adv, mask = map(jnp.asarray, _batch(1))
  default = losses.grpo_loss(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
  named = losses.grpo_loss(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0, policy_loss='clip')
  assert float(default[0]) == float(named[0])
  assert set(named[1]) == {'loss', 'kl', 'ratio', 'ratio_min', 'ratio_max', 'clip_frac', 'clip_frac_low',
                           'clip_frac_high', 'clip_frac_dual'}
  assert losses.LossConfig().policy_loss == 'clip' == load_config().rl.policy_loss


def test_micro_weights_are_for_registered_aggregations_and_count_completion_tokens():
  assert set(losses.MICRO_WEIGHTS) <= set(losses.LOSS_AGGREGATIONS)
  for name in losses.LOSS_AGGREGATIONS:
    assert losses.grpo_micro_weight(losses.LossConfig(loss_aggregation=name)) is losses.MICRO_WEIGHTS.get(name)

  class Batch:
    completion_mask = jnp.asarray(_batch()[4])

  weight = losses.completion_token_count(Batch)
  assert weight.dtype == jnp.float32 and float(weight) == 6 + 4 + 1 + 3
