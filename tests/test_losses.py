"""Tests for grpo_jax.core.losses.grpo_loss and the KL estimators of grpo_jax.core.kl."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.core.kl import KL_ESTIMATORS, adaptive_kl_beta, get_kl_fn, kl_k1, kl_k2, kl_k3
from grpo_jax.core.losses import LOSS_AGGREGATIONS, grpo_loss

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
  with pytest.raises(ValueError, match=f"^kl_estimator='{name}' is unknown; known: "):
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


# ---------------------------------------------------------------------------------------------------------------
# the switches (LossConfig / config.rl), each against a loop-by-loop numpy transcription of its formula


def _np_loss_loops(lp, old, ref, adv, mask, *, clip_eps=0.2, beta=0.0, kl_estimator='k3', clip_eps_high=None,
                   dual_clip=0.0, loss_aggregation='sequence_mean', importance_ratio='token', kl_in_reward=False,
                   entropy=None, entropy_coef=0.0):
  """The objective token by token, float64: (loss, metrics)."""
  lp, old, ref, adv = (np.asarray(x, np.float64) for x in (lp, old, ref, adv))
  n, t = lp.shape
  high = clip_eps if clip_eps_high is None else clip_eps_high
  kl_of = lambda a, b: float(_np_kl(kl_estimator, np.float64(a), np.float64(b)))  # noqa: E731
  sums, counts = [], []
  ratios, kls, low_flags, high_flags, dual_flags = [], [], [], [], []
  for i in range(n):
    tokens = [j for j in range(t) if mask[i, j]]
    if importance_ratio == 'sequence':
      seq_ratio = np.exp(np.mean([lp[i, j] - old[i, j] for j in tokens])) if tokens else 1.0
    total = 0.0
    for j in tokens:
      a = adv[i] if adv.ndim == 1 else adv[i, j]
      if kl_in_reward:
        a = a - beta * sum(kl_of(old[i, k], ref[i, k]) for k in tokens if k >= j)
      r = seq_ratio if importance_ratio == 'sequence' else np.exp(lp[i, j] - old[i, j])
      clipped_r = min(max(r, 1 - clip_eps), 1 + high)
      x = min(r * a, clipped_r * a)
      if dual_clip and a < 0:
        dual_flags.append(max(r, clipped_r) > dual_clip)
        x = max(x, dual_clip * a)
      else:
        dual_flags.append(False)
      kl = kl_of(lp[i, j], ref[i, j])
      if not kl_in_reward:
        x -= beta * kl
      if entropy_coef:
        x += entropy_coef * entropy[i, j]
      total += x
      ratios.append(r)
      kls.append(kl)
      low_flags.append(a < 0 and r < 1 - clip_eps)
      high_flags.append(a > 0 and r > 1 + high)
    sums.append(total)
    counts.append(len(tokens))
  if loss_aggregation == 'sequence_mean':
    objective = np.mean([s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)])
  elif loss_aggregation == 'token_mean':
    objective = sum(sums) / max(sum(counts), 1)
  elif loss_aggregation == 'constant':
    objective = sum(sums) / (n * t)
  else:
    objective = np.mean(sums)
  metrics = {'loss': -objective, 'kl': np.mean(kls), 'ratio': np.mean(ratios), 'ratio_min': min(ratios),
             'ratio_max': max(ratios), 'clip_frac_low': np.mean(low_flags), 'clip_frac_high': np.mean(high_flags),
             'clip_frac': np.mean(low_flags) + np.mean(high_flags), 'clip_frac_dual': np.mean(dual_flags)}
  return -objective, metrics


_STATIC = ('beta', 'kl_estimator', 'dual_clip', 'loss_aggregation', 'importance_ratio', 'kl_in_reward', 'entropy_coef',
           'policy_loss')
_jit_switch_loss = jax.jit(grpo_loss, static_argnames=_STATIC)


def _switch_call(lp, old, ref, adv, mask, **kw):
  entropy = kw.pop('entropy', None)
  loss, metrics = _jit_switch_loss(*map(jnp.asarray, (lp, old, ref, adv, mask)),
                                   entropy=None if entropy is None else jnp.asarray(entropy), **kw)
  return float(loss), {k: float(v) for k, v in metrics.items()}


def _entropy(seed, shape):
  return np.random.default_rng(seed).uniform(0.0, 3.0, size=shape).astype(np.float32)


# Each switch alone, then some together; beta > 0 wherever the KL matters.
SWITCHES = [
    dict(loss_aggregation='token_mean'),
    dict(loss_aggregation='constant'),
    dict(loss_aggregation='sequence_sum'),
    dict(clip_eps_high=0.28),
    dict(dual_clip=1.3),
    dict(importance_ratio='sequence'),
    dict(kl_in_reward=True, beta=0.1),
    dict(kl_in_reward=True, beta=0.1, kl_estimator='k1'),
    dict(kl_estimator='k3_k2grad', beta=0.1),
    dict(entropy_coef=0.01),
    dict(loss_aggregation='token_mean', clip_eps_high=0.28, dual_clip=1.3, beta=0.04),
    dict(importance_ratio='sequence', loss_aggregation='constant', kl_in_reward=True, beta=0.1, entropy_coef=0.02),
]
_IDS = ['-'.join(f'{k}={v}' for k, v in kw.items()) for kw in SWITCHES]


@pytest.mark.parametrize('per_token_adv', [False, True])
@pytest.mark.parametrize('switches', SWITCHES, ids=_IDS)
def test_switches_match_numpy_loops(switches, per_token_adv):
  lp, old, ref, adv, mask = _random_batch(51 + per_token_adv, n=8, t=9, per_token_adv=per_token_adv)
  kw = dict(clip_eps=0.2, beta=0.0, **{k: v for k, v in switches.items() if k != 'beta'})
  kw['beta'] = switches.get('beta', 0.0)
  if kw.get('entropy_coef'):
    kw['entropy'] = _entropy(7, lp.shape)
  loss, metrics = _switch_call(lp, old, ref, adv, mask, **kw)
  want_loss, want_metrics = _np_loss_loops(lp, old, ref, adv, mask, **kw)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  _assert_metrics_close(metrics, want_metrics)
  np.testing.assert_allclose(metrics['clip_frac'], metrics['clip_frac_low'] + metrics['clip_frac_high'], atol=1e-7)
  if kw.get('dual_clip'):
    assert want_metrics['clip_frac_dual'] > 0  # the batch reaches the dual clip's floor


def test_default_switches_are_the_paper_objective():
  """The defaults are the paper's choices spelled out, value for value, and the loop reference with every switch at
  its default is the original reference (so the new reference is checked against the old one too)."""
  batch = _random_batch(61)
  explicit = dict(clip_eps_high=0.2, dual_clip=0.0, loss_aggregation='sequence_mean', importance_ratio='token',
                  kl_in_reward=False, entropy_coef=0.0)
  base = _switch_call(*batch, clip_eps=0.2, beta=0.04)
  spelled = _switch_call(*batch, clip_eps=0.2, beta=0.04, **explicit)
  assert base == spelled
  np.testing.assert_allclose(_np_loss_loops(*batch, clip_eps=0.2, beta=0.04)[0], _np_grpo(*batch, 0.2, 0.04)[0],
                             rtol=1e-12)


def _np_numeric_grad(f, x, h=1e-6):
  """Central differences of a float64 scalar function, element by element."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (f(up) - f(down)) / (2 * h)
  return grad


@functools.partial(jax.jit, static_argnames=_STATIC)
def _jit_switch_grads(lp, old, ref, adv, mask, entropy, **kw):
  return jax.grad(lambda x, e: grpo_loss(x, old, ref, adv, mask, entropy=e, **kw)[0], argnums=(0, 1))(lp, entropy)


@pytest.mark.parametrize('switches', SWITCHES, ids=_IDS)
def test_switch_gradients_match_finite_differences_of_numpy(switches):
  """d loss / d logprobs (and / d entropy) against central differences of the loop reference: the sequence ratio's
  gradient reaches every token of its output, the dual clip and kl_in_reward's KL pass none, k3_k2grad follows k2."""
  lp, old, ref, adv, mask = _random_batch(71, n=6, t=7, per_token_adv=True)
  kw = dict(clip_eps=0.2, **switches)
  kw.setdefault('beta', 0.0)
  entropy = _entropy(8, lp.shape)
  grad_lp, grad_entropy = _jit_switch_grads(*map(jnp.asarray, (lp, old, ref, adv, mask, entropy)), **kw)
  np_kw = dict(kw, entropy=entropy)
  if kw.get('kl_estimator') == 'k3_k2grad':
    # The loss's value is k3's, its gradient is k2's: differentiate the reference with k2 in the KL term.
    np_kw['kl_estimator'] = 'k2'
  want_lp = _np_numeric_grad(lambda x: _np_loss_loops(x, old, ref, adv, mask, **np_kw)[0], lp)
  np.testing.assert_allclose(np.asarray(grad_lp), want_lp, rtol=2e-4, atol=2e-6)
  want_entropy = _np_numeric_grad(lambda e: _np_loss_loops(lp, old, ref, adv, mask, **dict(np_kw, entropy=e))[0],
                                  entropy)
  np.testing.assert_allclose(np.asarray(grad_entropy), want_entropy, rtol=2e-4, atol=2e-6)
  assert np.any(np.asarray(grad_lp) != 0)


def test_aggregations_weigh_tokens_as_documented():
  """Each aggregation is a weighted sum of the masked per-token objective x_it: weights 1 / (N |o_i|), 1 / sum |o_i|,
  1 / (N T) and 1 / N; so the gradient of each w.r.t. the advantage-weighted token terms (on-policy, no clip active)
  is that weight times A."""
  lp, _, ref, _, mask = _random_batch(81, n=5, t=6)
  adv = np.random.default_rng(0).normal(size=lp.shape).astype(np.float32)
  n, t = mask.shape
  lengths = mask.sum(-1, keepdims=True)
  weights = {'sequence_mean': mask / (n * np.maximum(lengths, 1)), 'token_mean': mask / mask.sum(),
             'constant': mask / (n * t), 'sequence_sum': mask / n}
  for aggregation, weight in weights.items():
    # On-policy, d ratio / d logprob = 1 and no clip binds: d loss / d logprob_it = -weight_it * A_it.
    grad = _jit_switch_grads(*map(jnp.asarray, (lp, lp, ref, adv, mask, np.zeros_like(lp))), clip_eps=0.2,
                             beta=0.0, loss_aggregation=aggregation)[0]
    np.testing.assert_allclose(np.asarray(grad), -weight * adv, rtol=1e-5, atol=1e-7, err_msg=aggregation)


@pytest.mark.parametrize('aggregation', ['sequence_mean', 'token_mean', 'constant', 'sequence_sum'])
def test_padding_columns_change_only_the_constant_normalizer(aggregation):
  lp, old, ref, adv, mask = _random_batch(91)
  n, t, extra = *lp.shape, 3
  pad = lambda x: np.concatenate([x, np.full((n, extra), -1.0, x.dtype)], axis=1)  # noqa: E731
  padded_mask = np.concatenate([mask, np.zeros((n, extra), mask.dtype)], axis=1)
  base, _ = _switch_call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.04, loss_aggregation=aggregation)
  padded, _ = _switch_call(pad(lp), pad(old), pad(ref), adv, padded_mask, clip_eps=0.2, beta=0.04,
                           loss_aggregation=aggregation)
  # 'constant' divides by the completion budget T, which the extra columns raise; the others never see padding.
  scale = t / (t + extra) if aggregation == 'constant' else 1.0
  np.testing.assert_allclose(padded, base * scale, rtol=1e-5, atol=1e-7)


def test_clip_higher_lets_positive_advantages_through_up_to_eps_high():
  lp, old, ref, adv, mask = _random_batch(101, n=16, t=16, per_token_adv=True)
  ratio = np.exp(lp.astype(np.float64) - old)
  grad = lambda **kw: np.asarray(_jit_switch_grads(  # noqa: E731
      *map(jnp.asarray, (lp, old, ref, adv, mask, np.zeros_like(lp))), clip_eps=0.2, beta=0.0, **kw)[0])
  symmetric, higher = grad(), grad(clip_eps_high=0.3)
  between = (mask > 0) & (adv > 0) & (ratio > 1.2) & (ratio < 1.3)
  above = (mask > 0) & (adv > 0) & (ratio > 1.3)
  assert between.any() and above.any()
  np.testing.assert_array_equal(symmetric[between], 0.0)  # clipped at 1 + clip_eps
  assert np.all(higher[between] != 0)  # not any more
  np.testing.assert_array_equal(higher[above], 0.0)
  # The lower side is clip_eps's either way.
  lower = (mask > 0) & (adv < 0)
  np.testing.assert_array_equal(symmetric[lower], higher[lower])


def test_dual_clip_floors_negative_advantages_and_zeroes_their_gradient():
  lp, old, ref, adv, mask = _random_batch(111, n=8, t=9, per_token_adv=True)
  lp = lp + 0.4 * (adv < 0)  # push some ratios of negative-advantage tokens far above 1
  ratio = np.exp(lp.astype(np.float64) - old)
  args = map(jnp.asarray, (lp, old, ref, adv, mask, np.zeros_like(lp)))
  grad = np.asarray(_jit_switch_grads(*args, clip_eps=0.2, beta=0.0, dual_clip=1.5)[0])
  floored = (mask > 0) & (adv < 0) & (ratio > 1.5)
  flowing = (mask > 0) & (adv < 0) & (ratio > 1.2) & (ratio < 1.5)
  assert floored.any() and flowing.any()
  np.testing.assert_array_equal(grad[floored], 0.0)
  assert np.all(grad[flowing] != 0)
  # The floor only raises the objective.
  with_floor, metrics = _switch_call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0, dual_clip=1.5)
  without, _ = _switch_call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
  assert with_floor < without
  np.testing.assert_allclose(metrics['clip_frac_dual'], floored.sum() / mask.sum(), rtol=1e-6)


def test_sequence_ratio_is_one_value_per_output_and_equals_gspo():
  """With outcome advantages and the default aggregation the objective is GSPO's (1/N) sum_i min(s_i A_i,
  clip(s_i) A_i), s_i = exp(mean_t (logp - old)) over output i's tokens."""
  lp, old, ref, adv, mask = _random_batch(121, n=8, t=9)
  loss, metrics = _switch_call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.0, importance_ratio='sequence')
  gspo = []
  for i in range(lp.shape[0]):
    keep = mask[i] > 0
    s = np.exp(np.mean(lp[i][keep].astype(np.float64) - old[i][keep]))
    gspo.append(min(s * adv[i], np.clip(s, 0.8, 1.2) * adv[i]))
  np.testing.assert_allclose(loss, -np.mean(gspo), rtol=1e-5, atol=1e-7)
  # On-policy the sequence and token ratios are both 1: the same loss.
  on_policy = [_switch_call(lp, lp, ref, adv, mask, clip_eps=0.2, beta=0.0, importance_ratio=r)[0]
               for r in ('token', 'sequence')]
  np.testing.assert_allclose(*on_policy, rtol=1e-6)


def test_kl_in_reward_moves_the_kl_out_of_the_gradient():
  """kl_in_reward: the loss's gradient w.r.t. logprobs is the surrogate's alone, with the advantages shifted by
  -beta * (KL of pi_old to go); nothing flows to old or reference logprobs."""
  lp, old, ref, adv, mask = map(jnp.asarray, _random_batch(131, n=6, t=7))
  in_reward = lambda x, o, r: grpo_loss(x, o, r, adv, mask, clip_eps=0.2, beta=0.1, kl_in_reward=True)[0]  # noqa: E731
  grads = jax.grad(in_reward, argnums=(0, 1, 2))(lp, old, ref)
  np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)
  kl_old = np.where(np.asarray(mask) > 0, _np_kl('k3', np.asarray(old, np.float64), np.asarray(ref, np.float64)), 0.0)
  to_go = np.array([[kl_old[i, j:].sum() for j in range(kl_old.shape[1])] for i in range(kl_old.shape[0])])
  shifted = (np.asarray(adv)[:, None] - 0.1 * to_go).astype(np.float32)
  no_kl = jax.grad(lambda x: grpo_loss(x, old, ref, jnp.asarray(shifted), mask, clip_eps=0.2, beta=0.0)[0])(lp)
  np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(no_kl), rtol=1e-5, atol=1e-8)


def test_k3_k2grad_has_k3s_value_and_k2s_gradient_in_the_loss():
  lp, old, ref, adv, mask = map(jnp.asarray, _random_batch(141))
  loss_of = lambda name: (lambda x: grpo_loss(x, old, ref, adv, mask, beta=0.5, kl_estimator=name)[0])  # noqa: E731
  np.testing.assert_allclose(float(loss_of('k3_k2grad')(lp)), float(loss_of('k3')(lp)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(loss_of('k3_k2grad'))(lp)), np.asarray(jax.grad(loss_of('k2'))(lp)),
                             rtol=1e-6, atol=1e-9)
  assert not np.allclose(np.asarray(jax.grad(loss_of('k3'))(lp)), np.asarray(jax.grad(loss_of('k2'))(lp)))


def test_token_mean_over_micro_batches_weighted_by_tokens_is_the_batch_token_mean():
  """Gradient accumulation with grpo_micro_weight: 'token_mean' weighs micro-batches by their tokens (then the
  weighted mean of their losses is the batch's); the other aggregations by equal weights."""
  from grpo_jax.core.losses import LossConfig, completion_token_count, grpo_micro_weight
  from grpo_jax.rollout.rollout import Rollout
  lp, old, ref, adv, mask = _random_batch(151, n=8, t=9)
  for aggregation in LOSS_AGGREGATIONS:
    full, _ = _switch_call(lp, old, ref, adv, mask, clip_eps=0.2, beta=0.04, loss_aggregation=aggregation)
    halves = [slice(0, 4), slice(4, 8)]
    losses = [_switch_call(lp[h], old[h], ref[h], adv[h], mask[h], clip_eps=0.2, beta=0.04,
                           loss_aggregation=aggregation)[0] for h in halves]
    weight_fn = grpo_micro_weight(LossConfig(loss_aggregation=aggregation))
    if weight_fn is None:
      weights = np.ones(2)
    else:
      weights = np.array([float(weight_fn(Rollout(None, None, None, mask[h], None, None, None))) for h in halves])
      assert weight_fn is completion_token_count
    np.testing.assert_allclose(np.dot(weights / weights.sum(), losses), full, rtol=1e-5, err_msg=aggregation)


@pytest.mark.parametrize('kw, match', [
    (dict(loss_aggregation='mean'), r"^loss_aggregation='mean' is unknown; known: \['constant', 'sequence_mean', "
                                    r"'sequence_sum', 'token_mean'\]$"),
    (dict(importance_ratio='seq'), r"^importance_ratio='seq' is unknown; known: \['sequence', 'token'\]$"),
    (dict(kl_estimator='k4'), r"^kl_estimator='k4' is unknown; known: \['exact', 'k1', 'k2', 'k3', 'k3_k2grad'\]$"),
    (dict(policy_loss='ppo'), r"^policy_loss='ppo' is unknown; known: \['clip'\]$"),
])
def test_unknown_switch_names_list_the_valid_ones(kw, match):
  lp, old, ref, adv, mask = map(jnp.asarray, _random_batch(0))
  with pytest.raises(ValueError, match=match):
    grpo_loss(lp, old, ref, adv, mask, **kw)
  from grpo_jax.core.losses import LossConfig
  with pytest.raises(ValueError, match=match):
    LossConfig(**kw)


@pytest.mark.parametrize('kw, match', [
    (dict(clip_eps=0.2, clip_eps_high=0.1), r'clip_eps_high=0\.1 must be 0 .* >= clip_eps=0\.2'),
    (dict(dual_clip=1.0), r'dual_clip=1\.0 must be 0'),
    (dict(dual_clip=0.5), r'dual_clip=0\.5 must be 0'),
])
def test_loss_config_rejects_contradictory_clips(kw, match):
  from grpo_jax.core.losses import LossConfig
  with pytest.raises(ValueError, match=match):
    LossConfig(**kw)
  assert LossConfig(clip_eps=0.2).upper_clip_eps == 0.2
  assert LossConfig(clip_eps=0.2, clip_eps_high=0.28).upper_clip_eps == 0.28


# ---------------------------------------------------------------------------------------------------------------
# the step's metrics over micro-batches and minibatches


def test_combine_metrics_takes_min_and_max_of_the_extremes():
  from grpo_jax.pipeline.train_state import combine_metrics
  rows = [{'ratio': 1.0, 'ratio_min': 0.7, 'ratio_max': 1.4, 'clip_frac': 0.1},
          {'ratio': 1.2, 'ratio_min': 0.9, 'ratio_max': 1.9, 'clip_frac': 0.3}]
  got = {k: float(v) for k, v in combine_metrics([{k: jnp.float32(v) for k, v in r.items()} for r in rows]).items()}
  want = {'ratio': np.mean([r['ratio'] for r in rows]), 'ratio_min': min(r['ratio_min'] for r in rows),
          'ratio_max': max(r['ratio_max'] for r in rows), 'clip_frac': np.mean([r['clip_frac'] for r in rows])}
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize('aggregation', ['token_mean', 'sequence_mean'])
def test_grad_accumulation_matches_one_batch_for_the_aggregation(aggregation):
  """make_train_step with grad_accum_steps=2 and grpo_micro_weight equals the one-batch step: loss, gradient
  (sgd(1.0): new params = params - grad), token-mean metrics, and ratio_min / ratio_max (a min / max over the
  micro-batches, not a mean)."""
  import optax
  from helpers import compiled_step, grpo_batch, host_params

  from grpo_jax.core.losses import LossConfig, grpo_micro_weight, grpo_objective
  graphdef, params = host_params()
  batch = grpo_batch(8, 5, 7, seed=3)  # random completion lengths: the micro-batches differ in tokens
  config = LossConfig(loss_aggregation=aggregation, clip_eps_high=0.3)
  loss_fn = functools.partial(grpo_objective, config=config)
  out = {}
  for k in (1, 2):
    compiled, state = compiled_step(graphdef, params, optax.sgd(1.0), loss_fn, batch, grad_accum_steps=k,
                                    micro_weight=grpo_micro_weight(config))
    new_state, metrics = compiled(state, batch, {'beta': np.float32(0.04)})
    out[k] = (jax.tree.map(np.asarray, new_state.params), {key: float(v) for key, v in metrics.items()})
  one, two = out[1][1], out[2][1]
  assert one['ratio_min'] < one['ratio'] < one['ratio_max']
  for key in ('loss', 'ratio', 'ratio_min', 'ratio_max', 'kl', 'entropy'):
    if key in ('ratio', 'kl', 'entropy') and aggregation != 'token_mean':
      continue  # equal micro-batch weights: a mean of token means, not the batch's token mean
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for x, y in zip(jax.tree.leaves(out[2][0]), jax.tree.leaves(out[1][0]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_train_step_runs_with_every_switch_on():
  """The switches through a real model's train step (the entropy bonus differentiates the model's entropy): one
  compile, a finite update that moves the params, and every diagnostic reported."""
  import optax
  from helpers import compiled_step, grpo_batch, host_params

  from grpo_jax.core.losses import LossConfig, grpo_micro_weight, grpo_objective
  graphdef, params = host_params()
  batch = grpo_batch(8, 5, 7, seed=4)
  config = LossConfig(clip_eps_high=0.28, dual_clip=3.0, kl_estimator='k3_k2grad', kl_in_reward=True,
                      loss_aggregation='token_mean', importance_ratio='sequence', entropy_coef=0.01)
  loss_fn = functools.partial(grpo_objective, config=config)
  compiled, state = compiled_step(graphdef, params, optax.sgd(0.1), loss_fn, batch, grad_accum_steps=2,
                                  micro_weight=grpo_micro_weight(config))
  before = jax.tree.map(np.asarray, params)
  new_state, metrics = compiled(state, batch, {'beta': np.float32(0.04)})
  metrics = {k: float(v) for k, v in metrics.items()}
  assert METRICS | {'entropy', 'grad_norm', 'nonfinite'} <= set(metrics)
  assert metrics['nonfinite'] == 0 and all(np.isfinite(v) for v in metrics.values())
  assert metrics['ratio_min'] <= metrics['ratio'] <= metrics['ratio_max']
  assert any(not np.array_equal(np.asarray(x), b) for x, b in zip(jax.tree.leaves(new_state.params),
                                                                   jax.tree.leaves(before), strict=True))
