"""Tests for grpo_jax.core.losses.grpo_loss and the KL estimators of grpo_jax.core.kl."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.core.kl import KL_ESTIMATORS, adaptive_kl_beta, get_kl_fn, kl_k1, kl_k2, kl_k3
from grpo_jax.core.losses import grpo_loss

# ---------------------------------------------------------------------------------------------------------------
# numpy references, written from the formulas (float64)


def _np_kl(name, lp, ref):
  log_r = ref - lp  # r = pi_ref / pi_theta
  if name == 'k1':
    return -log_r
  if name == 'k2':
    return 0.5 * log_r**2
  if name in ('k3', 'k3_k2grad'):  # k3_k2grad: k3's value (its gradient is k2's)
    return np.exp(log_r) - log_r - 1.0
  raise AssertionError(name)


def _np_grpo(lp, old, ref, adv, mask, clip_eps, beta, kl_estimator='k3'):
  lp, old, ref, adv = (np.asarray(x, np.float64) for x in (lp, old, ref, adv))
  mask = np.asarray(mask, np.float64)
  if adv.ndim == 1:
    adv = adv[:, None] * np.ones_like(lp)
  ratio = np.exp(lp - old)
  surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
  kl = _np_kl(kl_estimator, lp, ref)
  per_token = surrogate - beta * kl
  objective = []
  for i in range(lp.shape[0]):
    keep = mask[i] > 0
    objective.append(per_token[i][keep].mean() if keep.any() else 0.0)
  loss = -np.mean(objective)
  keep = mask > 0
  clipped_high = (adv > 0) & (ratio > 1 + clip_eps)
  clipped_low = (adv < 0) & (ratio < 1 - clip_eps)
  clipped = clipped_high | clipped_low
  metrics = {'loss': loss, 'kl': kl[keep].mean(), 'ratio': ratio[keep].mean(), 'clip_frac': clipped[keep].mean(),
             'clip_frac_low': clipped_low[keep].mean(), 'clip_frac_high': clipped_high[keep].mean(),
             'clip_frac_dual': 0.0, 'ratio_min': ratio[keep].min(), 'ratio_max': ratio[keep].max()}
  return loss, metrics


def _np_grad_wrt_logprobs(lp, old, ref, adv, mask, clip_eps, beta):
  """d loss / d logprobs for the k3 estimator, by hand."""
  lp, old, ref, adv = (np.asarray(x, np.float64) for x in (lp, old, ref, adv))
  mask = np.asarray(mask, np.float64)
  if adv.ndim == 1:
    adv = adv[:, None] * np.ones_like(lp)
  n = lp.shape[0]
  ratio = np.exp(lp - old)
  clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
  d_surrogate = np.where(clipped, 0.0, ratio * adv)  # d(ratio * A)/d lp = ratio * A; the clipped branch is flat
  d_k3 = 1.0 - np.exp(ref - lp)
  lengths = np.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
  return -(d_surrogate - beta * d_k3) * mask / lengths / n


def _random_batch(seed, n=6, t=7, per_token_adv=False, empty_row=False):
  rng = np.random.default_rng(seed)
  old = rng.uniform(-3.0, -0.05, size=(n, t)).astype(np.float32)
  lp = (old + rng.normal(scale=0.3, size=(n, t))).astype(np.float32)  # ratios on both sides of the clip range
  ref = (old + rng.normal(scale=0.3, size=(n, t))).astype(np.float32)
  adv = rng.normal(size=(n, t) if per_token_adv else (n,)).astype(np.float32)
  lengths = rng.integers(1, t + 1, size=n)
  lengths[0] = t  # one full row
  if empty_row:
    lengths[-1] = 0
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)  # ragged, right-padded
  return lp, old, ref, adv, mask


# Jitted once per (shape, beta, estimator): much faster on CPU than op-by-op eager dispatch. clip_eps is traced.
_jit_loss = jax.jit(grpo_loss, static_argnames=('beta', 'kl_estimator'))


def _call(lp, old, ref, adv, mask, **kw):
  loss, metrics = _jit_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                            **kw)
  return float(loss), {k: float(v) for k, v in metrics.items()}


METRICS = {'loss', 'kl', 'ratio', 'ratio_min', 'ratio_max', 'clip_frac', 'clip_frac_low', 'clip_frac_high',
           'clip_frac_dual'}


def _assert_metrics_close(got, want, rtol=1e-5, atol=1e-6):
  assert set(got) == METRICS
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# grpo_loss vs the reference


@pytest.mark.parametrize('per_token_adv', [False, True])
@pytest.mark.parametrize('clip_eps,beta', [(0.2, 0.0), (0.2, 0.04), (0.1, 0.5), (0.3, 0.01)])
def test_loss_matches_numpy(per_token_adv, clip_eps, beta):
  batch = _random_batch(int(clip_eps * 100 + beta * 1000) + per_token_adv, per_token_adv=per_token_adv)
  loss, metrics = _call(*batch, clip_eps=clip_eps, beta=beta)
  want_loss, want_metrics = _np_grpo(*batch, clip_eps=clip_eps, beta=beta)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  _assert_metrics_close(metrics, want_metrics)
  # The batch really exercises the clip (otherwise the comparison says little about it).
  assert 0 < want_metrics['clip_frac'] < 1


@pytest.mark.parametrize('kl_estimator', ['k1', 'k2', 'k3'])
def test_loss_matches_numpy_for_each_kl_estimator(kl_estimator):
  batch = _random_batch(11)
  loss, metrics = _call(*batch, clip_eps=0.2, beta=0.1, kl_estimator=kl_estimator)
  want_loss, want_metrics = _np_grpo(*batch, clip_eps=0.2, beta=0.1, kl_estimator=kl_estimator)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  _assert_metrics_close(metrics, want_metrics)


def test_each_output_is_averaged_over_its_own_length():
  # Output 0 has 1 token with objective 2, output 1 has 4 tokens with objective 0 each (A = 0).
  # Per-output means: [2, 0] -> loss = -(2 + 0) / 2 = -1. A token-level mean would give -2/5 instead.
  lp = np.zeros((2, 4), np.float32)
  adv = np.array([2.0, 0.0], np.float32)
  mask = np.array([[1, 0, 0, 0], [1, 1, 1, 1]], np.int32)
  loss, _ = _call(lp, lp, lp, adv, mask, clip_eps=0.2, beta=0.0)
  np.testing.assert_allclose(loss, -1.0, rtol=1e-6)


def test_empty_output_contributes_zero_but_counts_in_the_mean():
  batch = _random_batch(5, empty_row=True)
  lp, old, ref, adv, mask = batch
  assert mask[-1].sum() == 0
  loss, metrics = _call(*batch, clip_eps=0.2, beta=0.04)
  assert np.isfinite(loss)
  want_loss, want_metrics = _np_grpo(*batch, clip_eps=0.2, beta=0.04)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  _assert_metrics_close(metrics, want_metrics)
  # Dropping the empty row rescales the mean by N / (N - 1).
  rest, _ = _call(lp[:-1], old[:-1], ref[:-1], adv[:-1], mask[:-1], clip_eps=0.2, beta=0.04)
  n = lp.shape[0]
  np.testing.assert_allclose(loss, rest * (n - 1) / n, rtol=1e-5)


def test_all_masked_batch_is_finite_zero():
  lp, old, ref, adv, mask = _random_batch(6)
  loss, metrics = _call(lp, old, ref, adv, np.zeros_like(mask), clip_eps=0.2, beta=0.04)
  assert loss == 0.0
  assert all(np.isfinite(v) for v in metrics.values())


def test_eager_matches_jit():
  batch = _random_batch(8)
  loss_eager, metrics_eager = grpo_loss(*map(jnp.asarray, batch), clip_eps=0.2, beta=0.04, kl_estimator='k3')
  loss, metrics = _call(*batch, clip_eps=0.2, beta=0.04)
  np.testing.assert_allclose(float(loss_eager), loss, rtol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(float(metrics_eager[key]), metrics[key], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# invariances


@pytest.mark.parametrize('per_token_adv,kl_estimator', [(False, 'k3'), (True, 'k1')])
def test_on_policy_without_kl_is_minus_mean_advantage(per_token_adv, kl_estimator):
  lp, _, ref, adv, mask = _random_batch(3, per_token_adv=per_token_adv)
  loss, metrics = _call(lp, lp, ref, adv, mask, clip_eps=0.2, beta=0.0, kl_estimator=kl_estimator)
  if per_token_adv:
    # Mean over each output's masked tokens, then over outputs.
    expected = -np.mean((adv * mask).sum(-1) / mask.sum(-1))
  else:
    expected = -adv.mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['ratio'], 1.0, rtol=1e-6)
  assert metrics['clip_frac'] == 0.0


@pytest.mark.parametrize('per_token_adv', [False, True])
@pytest.mark.parametrize('beta', [0.0, 0.04])
def test_padding_columns_do_not_change_loss_or_metrics(per_token_adv, beta):
  lp, old, ref, adv, mask = _random_batch(4, per_token_adv=per_token_adv)
  n, extra = lp.shape[0], 5
  rng = np.random.default_rng(123)
  garbage = lambda: rng.uniform(-6.0, 3.0, size=(n, extra)).astype(np.float32)  # noqa: E731
  pad = lambda x: np.concatenate([x, garbage()], axis=1)  # noqa: E731
  padded_adv = pad(adv) if per_token_adv else adv
  padded_mask = np.concatenate([mask, np.zeros((n, extra), mask.dtype)], axis=1)
  base_loss, base_metrics = _call(lp, old, ref, adv, mask, clip_eps=0.2, beta=beta)
  loss, metrics = _call(pad(lp), pad(old), pad(ref), padded_adv, padded_mask, clip_eps=0.2, beta=beta)
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6, atol=1e-7)
  _assert_metrics_close(metrics, base_metrics, rtol=1e-6, atol=1e-7)


def test_garbage_under_existing_mask_zeros_does_not_matter():
  lp, old, ref, adv, mask = _random_batch(9, per_token_adv=True)
  rng = np.random.default_rng(0)
  noisy = [np.where(mask > 0, x, rng.uniform(-6.0, 3.0, size=x.shape)).astype(np.float32) for x in (lp, old, ref, adv)]
  base = _call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.04)
  got = _call(*noisy, mask, clip_eps=0.2, beta=0.04)
  np.testing.assert_allclose(got[0], base[0], rtol=1e-6, atol=1e-7)
  _assert_metrics_close(got[1], base[1], rtol=1e-6, atol=1e-7)


def test_extreme_finite_padding_values_do_not_poison_loss():
  lp = np.array([[-0.5, -200.0]], np.float32)  # a padded slot where the policy gives the pad token ~0 probability
  old = np.array([[-0.4, -200.0]], np.float32)
  ref = np.array([[-0.5, 0.0]], np.float32)  # k3 = exp(ref - lp) - ... = exp(200) overflows to inf
  adv, mask = np.array([1.0], np.float32), np.array([[1, 0]], np.int32)
  loss, metrics = _call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.04)
  want, _ = _call(lp[:, :1], old[:, :1], ref[:, :1], adv, mask[:, :1], clip_eps=0.2, beta=0.04)
  assert np.isfinite(loss) and np.isfinite(metrics['kl'])
  np.testing.assert_allclose(loss, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# gradients


@functools.partial(jax.jit, static_argnames=('beta',))
def _jit_grad(lp, old, ref, adv, mask, *, clip_eps, beta):
  return jax.grad(lambda x: grpo_loss(x, old, ref, adv, mask, clip_eps=clip_eps, beta=beta)[0])(lp)


def _grad(lp, old, ref, adv, mask, **kw):
  return np.asarray(_jit_grad(*map(jnp.asarray, (lp, old, ref, adv, mask)), **kw))


@pytest.mark.parametrize('per_token_adv', [False, True])
def test_gradient_zero_on_masked_and_actively_clipped_tokens(per_token_adv):
  lp, old, ref, adv, mask = _random_batch(21, n=8, t=9, per_token_adv=per_token_adv)
  grad = _grad(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
  ratio = np.exp(lp.astype(np.float64) - old)
  a = adv if per_token_adv else np.broadcast_to(adv[:, None], lp.shape)
  masked = mask == 0
  clipped_up = (ratio > 1.2) & (a > 0) & ~masked
  clipped_down = (ratio < 0.8) & (a < 0) & ~masked
  active = ~masked & ~clipped_up & ~clipped_down & (a != 0)
  assert masked.any() and clipped_up.any() and clipped_down.any() and active.any()  # every case is exercised
  np.testing.assert_array_equal(grad[masked], 0.0)
  np.testing.assert_array_equal(grad[clipped_up], 0.0)
  np.testing.assert_array_equal(grad[clipped_down], 0.0)
  assert np.all(grad[active] != 0)
  # On the other side of the clip (ratio > 1 + eps but A < 0) the unclipped term wins and the gradient flows.
  unclipped_side = ~masked & (ratio > 1.2) & (a < 0)
  assert unclipped_side.any()
  assert np.all(grad[unclipped_side] != 0)


@pytest.mark.parametrize('per_token_adv', [False, True])
@pytest.mark.parametrize('beta', [0.0, 0.5])
def test_gradient_matches_hand_derivation(per_token_adv, beta):
  batch = _random_batch(31, per_token_adv=per_token_adv)
  grad = _grad(*batch, clip_eps=0.2, beta=beta)
  np.testing.assert_allclose(grad, _np_grad_wrt_logprobs(*batch, clip_eps=0.2, beta=beta), rtol=1e-4, atol=1e-7)


def test_no_gradient_through_old_ref_or_advantages():
  lp, old, ref, adv, mask = map(jnp.asarray, _random_batch(41))
  grads = jax.grad(lambda o, r, a: grpo_loss(lp, o, r, a, mask, clip_eps=0.2, beta=0.04)[0], argnums=(0, 1, 2))(
      old, ref, adv)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_match_numpy():
  rng = np.random.default_rng(0)
  lp = rng.uniform(-5, 0, size=(4, 6)).astype(np.float32)
  ref = rng.uniform(-5, 0, size=(4, 6)).astype(np.float32)
  for name, fn in (('k1', kl_k1), ('k2', kl_k2), ('k3', kl_k3)):
    got = np.asarray(fn(jnp.asarray(lp), jnp.asarray(ref)))
    assert got.shape == lp.shape
    np.testing.assert_allclose(got, _np_kl(name, lp.astype(np.float64), ref.astype(np.float64)), rtol=1e-5,
                               atol=1e-6, err_msg=name)
    assert get_kl_fn(name) is fn
  assert set(KL_ESTIMATORS) == {'k1', 'k2', 'k3', 'k3_k2grad'}
  # The straight-through estimator's value is k3's.
  np.testing.assert_allclose(np.asarray(get_kl_fn('k3_k2grad')(jnp.asarray(lp), jnp.asarray(ref))),
                             _np_kl('k3', lp.astype(np.float64), ref.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_kl_hand_values():
  # logprobs = log 0.5, ref = log 0.25: log r = log 0.5, r = 0.5.
  lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
  np.testing.assert_allclose(np.asarray(kl_k1(lp, ref)), [np.log(2.0)], rtol=1e-6)  # -log r
  np.testing.assert_allclose(np.asarray(kl_k2(lp, ref)), [0.5 * np.log(2.0) ** 2], rtol=1e-6)  # (log r)^2 / 2
  np.testing.assert_allclose(np.asarray(kl_k3(lp, ref)), [0.5 - np.log(0.5) - 1.0], rtol=1e-6)  # r - log r - 1


def test_k3_nonnegative_and_zero_on_equal():
  rng = np.random.default_rng(1)
  lp = jnp.asarray(rng.uniform(-8, 0, size=(64,)).astype(np.float32))
  ref = jnp.asarray(rng.uniform(-8, 0, size=(64,)).astype(np.float32))
  assert np.all(np.asarray(kl_k3(lp, ref)) >= 0)
  assert np.all(np.asarray(kl_k3(lp, ref))[np.asarray(lp != ref)] > 0)
  np.testing.assert_array_equal(np.asarray(kl_k3(lp, lp)), 0.0)
  np.testing.assert_array_equal(np.asarray(kl_k2(lp, lp)), 0.0)
  np.testing.assert_array_equal(np.asarray(kl_k1(lp, lp)), 0.0)
  assert np.any(np.asarray(kl_k1(lp, ref)) < 0)  # k1 is the one that can go negative


def test_k1_and_k3_are_unbiased_monte_carlo_estimates_of_kl():
  p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
  q = np.array([0.1, 0.3, 0.2, 0.2, 0.2])
  true_kl = float(np.sum(p * np.log(p / q)))  # KL(p || q) ~ 0.52
  samples = np.random.default_rng(0).choice(len(p), size=100_000, p=p)
  lp = jnp.asarray(np.log(p)[samples], jnp.float32)
  ref = jnp.asarray(np.log(q)[samples], jnp.float32)
  k3 = float(jnp.mean(kl_k3(lp, ref)))
  k1 = float(jnp.mean(kl_k1(lp, ref)))
  assert abs(k3 - true_kl) < 0.03 * true_kl + 0.005
  assert abs(k1 - true_kl) < 0.03 * true_kl + 0.005
  # The argument order matters: swapped, the samples from p no longer estimate KL(p || q).
  assert abs(float(jnp.mean(kl_k3(ref, lp))) - true_kl) > 0.05


@pytest.mark.parametrize('name', ['k9', '', 'K3', 'kl'])
def test_unknown_kl_estimator_raises(name):
  with pytest.raises(ValueError, match='unknown KL estimator'):
    get_kl_fn(name)
  lp, old, ref, adv, mask = map(jnp.asarray, _random_batch(0))
  with pytest.raises(ValueError, match='unknown KL estimator'):
    grpo_loss(lp, old, ref, adv, mask, kl_estimator=name)


@pytest.mark.parametrize('kl, target, want_error', [
    (0.02, 0.01, 0.2),  # KL twice the target: the error is clipped at +0.2
    (0.011, 0.01, 0.1),  # 10% above: beta grows by 0.1 * batch / horizon
    (0.0, 0.01, -0.2),  # no KL at all: clipped at -0.2
    (0.009, 0.01, -0.1),
])
def test_adaptive_kl_beta_is_ziegler_et_al_proportional_controller(kl, target, want_error):
  beta, batch, horizon = 0.04, 64, 1000.0
  # Ziegler et al. 2019, eq. 2, by hand: e = clip(KL / target - 1, -0.2, 0.2); beta * (1 + e * n / horizon).
  want = beta * (1.0 + want_error * batch / horizon)
  got = adaptive_kl_beta(np.float32(beta), np.float32(kl), target=target, horizon=horizon, batch_size=batch)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
