"""The exact full-vocabulary KL(pi || pi_ref): core/kl.exact_kl against numpy, rollout/reference.make_exact_kl_fn
against two tiny models' own logits, the per-token k3 estimator converging to it, and each per-token estimator's
value and gradient in exact expectation against the exact KL's (which are biased)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.core import kl
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.rollout.reference import make_exact_kl_fn

exact_kl = jax.jit(kl.exact_kl)


def _np_log_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_kl_per_token(logits, ref_logits):
  """[..., V] x 2 -> [...]: sum_v p (log p - log q) in float64."""
  logp, logq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  return (np.exp(logp) * (logp - logq)).sum(axis=-1)


def test_exact_kl_matches_numpy_with_padding():
  rng = np.random.default_rng(0)
  n, t, v = 3, 5, 17
  logits = (2.0 * rng.standard_normal((n, t, v))).astype(np.float32)
  ref_logits = (logits + rng.standard_normal((n, t, v))).astype(np.float32)
  mask = (np.arange(t)[None] < np.array([[5], [2], [0]])).astype(np.int32)  # a full, a short and an empty row
  expected = _np_kl_per_token(logits, ref_logits)[mask.astype(bool)].mean()
  logits[~mask.astype(bool)] = np.nan  # padding's logits never reach the result
  got = exact_kl(logits, ref_logits, mask)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert expected > 0.1  # a KL worth measuring, not a near-zero one any answer is close to


def test_exact_kl_is_zero_for_equal_logits_and_finite_with_masked_vocab():
  rng = np.random.default_rng(1)
  logits = (3.0 * rng.standard_normal((2, 4, 11))).astype(np.float32)
  mask = np.ones((2, 4), np.int32)
  assert float(exact_kl(logits, logits, mask)) == 0.0
  assert float(exact_kl(logits + 7.0, logits, mask)) < 1e-6  # a softmax ignores a shift
  assert float(exact_kl(logits, logits, np.zeros_like(mask))) == 0.0  # no real token
  # Tokens both models rule out (-inf logits) add 0 log(0 / 0) = 0, not nan.
  banned, banned_ref = logits.copy(), logits + rng.standard_normal(logits.shape).astype(np.float32)
  banned[..., :3] = banned_ref[..., :3] = -np.inf
  got = float(exact_kl(banned, banned_ref, mask))
  np.testing.assert_allclose(got, _np_kl_per_token(banned[..., 3:], banned_ref[..., 3:]).mean(), rtol=1e-5)


def test_exact_kl_fn_matches_each_rows_unpadded_logits():
  """Both models run over each row's real tokens alone (no padding, default positions): the slots that predict
  the completion tokens there give the KL numpy computes; make_exact_kl_fn sees the padded batch."""
  vocab, n, p, c = 50, 3, 5, 6
  cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(2)

  def random_params():  # abstract build + random numpy weights: eager init is slow on CPU
    draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'  # noqa: E731
                            else 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    params = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract)))
    return params

  params, ref_params = random_params(), random_params()
  prompt_mask = (np.arange(p)[None] >= np.array([[0], [2], [4]])).astype(np.int32)  # left-padded
  completion_mask = (np.arange(c)[None] < np.array([[6], [3], [1]])).astype(np.int32)  # right-padded
  prompt_tokens = np.where(prompt_mask, rng.integers(1, vocab, (n, p)), 0).astype(np.int32)
  completion_tokens = np.where(completion_mask, rng.integers(1, vocab, (n, c)), 0).astype(np.int32)

  got = make_exact_kl_fn(graphdef)(params, ref_params, prompt_tokens, prompt_mask, completion_tokens,
                                   completion_mask)

  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
  per_token = []
  for i in range(n):
    prompt = prompt_tokens[i][prompt_mask[i].astype(bool)]
    completion = completion_tokens[i][completion_mask[i].astype(bool)]
    tokens = np.concatenate([prompt, completion])[None]
    # Slot j predicts token j + 1: the completion's tokens are predicted from the last prompt slot on.
    at = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
    logits = np.asarray(forward(params, tokens))[0, at]
    ref_logits = np.asarray(forward(ref_params, tokens))[0, at]
    per_token.append(_np_kl_per_token(logits, ref_logits))
  expected = np.concatenate(per_token).mean()
  assert got.shape == ()
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)
  assert expected > 0.01
  same = make_exact_kl_fn(graphdef)(params, params, prompt_tokens, prompt_mask, completion_tokens, completion_mask)
  assert abs(float(same)) < 1e-6
  for chunk in (1, 4, 6, 8):  # the heads over chunks of completion positions (4: a padded last chunk)
    chunked = make_exact_kl_fn(graphdef, chunk_size=chunk)(params, ref_params, prompt_tokens, prompt_mask,
                                                           completion_tokens, completion_mask)
    np.testing.assert_allclose(float(chunked), expected, rtol=1e-4)


def test_k3_sample_mean_approaches_the_exact_kl():
  """k3 = r - log r - 1 (r = q / p) of tokens drawn from p is unbiased for KL(p || q): its expectation is the
  exact KL, and the mean of many draws lands within a few standard errors of it."""
  rng = np.random.default_rng(3)
  v, num_samples = 6, 200_000
  logits = rng.standard_normal(v).astype(np.float32)
  ref_logits = (logits + 0.7 * rng.standard_normal(v)).astype(np.float32)
  exact = float(exact_kl(logits[None, None], ref_logits[None, None], np.ones((1, 1), np.int32)))
  logp, logq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  probs = np.exp(logp)

  k3_of_every_token = np.asarray(kl.kl_k3(jnp.asarray(logp, jnp.float32), jnp.asarray(logq, jnp.float32)),
                                 np.float64)  # [v]
  np.testing.assert_allclose((probs * k3_of_every_token).sum(), exact, rtol=1e-4)  # the expectation, by hand

  tokens = rng.choice(v, size=num_samples, p=probs / probs.sum())
  sample_mean = float(np.asarray(kl.kl_k3(jnp.asarray(logp[tokens], jnp.float32),
                                          jnp.asarray(logq[tokens], jnp.float32)), np.float64).mean())
  # The estimator's true standard deviation (from the distribution, not the sample) sets the tolerance: 6 standard
  # errors is a 2e-9 miss for a normal mean, and the seed is fixed on top of that.
  std = np.sqrt((probs * (k3_of_every_token - exact) ** 2).sum())
  tolerance = 6 * std / np.sqrt(num_samples)
  assert exact > 20 * tolerance, (exact, tolerance)  # close to the KL, and not just close to 0
  assert abs(sample_mean - exact) < tolerance, (sample_mean, exact, tolerance)


def _expected_estimator_gradient(name, logits, ref_logits):
  """E_{x ~ pi}[grad_logits k(log pi(x), log q(x))], the expectation taken exactly: a sum over the vocabulary
  weighted by pi, with the weights held fixed (a loss differentiates its samples' logprobs, not how they were
  drawn). [V] x 2 -> [V]."""
  logq = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32))
  probs = np.exp(_np_log_softmax(logits))

  def estimate(z, token):
    logp = jax.nn.log_softmax(z)
    return kl.get_kl_fn(name)(logp[token], logq[token])

  per_token = jax.vmap(jax.grad(estimate), in_axes=(None, 0))(jnp.asarray(logits, jnp.float32),
                                                                jnp.arange(len(probs)))  # [V, V]
  return (probs[:, None] * np.asarray(per_token, np.float64)).sum(axis=0)


def _np_grad_kl(logits, ref_logits):
  """grad_logits KL(softmax(logits) || q) by hand, float64: sum_x pi(x) log(pi(x) / q(x)) grad log pi(x), with
  grad_z log pi(x) = e_x - pi."""
  logp, logq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  p = np.exp(logp)
  return p * (logp - logq) - p * (p * (logp - logq)).sum()


def _np_grad_reverse_kl(logits, ref_logits):
  """grad_logits KL(q || softmax(logits)) = -sum_x q(x) grad log pi(x) = pi - q."""
  return np.exp(_np_log_softmax(logits)) - np.exp(_np_log_softmax(ref_logits))


def test_kl_estimator_gradients_against_the_exact_kls_gradient():
  """Which estimators' gradients are unbiased for KL(pi || ref), on a tiny vocabulary, exactly (core/kl.py):
  k2 and k3_k2grad: unbiased (= grad KL(pi || ref)). k1: biased, zero in expectation. k3: biased, it is the gradient
  of the reverse KL(ref || pi). The exact gradient is also checked against autodiff of kl.exact_kl."""
  rng = np.random.default_rng(4)
  v = 7
  logits = rng.standard_normal(v).astype(np.float32)
  ref_logits = (logits + 1.0 * rng.standard_normal(v)).astype(np.float32)
  exact = _np_grad_kl(logits, ref_logits)
  autodiff = jax.grad(lambda z: kl.exact_kl(z[None, None], jnp.asarray(ref_logits)[None, None],
                                            jnp.ones((1, 1), jnp.int32)))(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(autodiff), exact, rtol=1e-4, atol=1e-6)
  scale = np.abs(exact).max()
  assert scale > 0.05  # far enough from pi = ref for biased and unbiased to differ

  gradients = {name: _expected_estimator_gradient(name, logits, ref_logits) for name in kl.KL_ESTIMATORS}
  assert set(gradients) == {'k1', 'k2', 'k3', 'k3_k2grad'}
  for unbiased in ('k2', 'k3_k2grad'):
    np.testing.assert_allclose(gradients[unbiased], exact, rtol=1e-4, atol=1e-6 * scale, err_msg=unbiased)
  np.testing.assert_allclose(gradients['k1'], 0.0, atol=1e-6)  # E_pi[grad log pi] = 0
  np.testing.assert_allclose(gradients['k3'], _np_grad_reverse_kl(logits, ref_logits), rtol=1e-4, atol=1e-6)
  for biased in ('k1', 'k3'):
    assert np.abs(gradients[biased] - exact).max() > 0.1 * scale, biased


def test_estimator_values_in_expectation():
  """The values, exactly in expectation over pi: k1, k3 and k3_k2grad (k3's value) are unbiased for KL(pi || ref);
  k2 is not."""
  rng = np.random.default_rng(5)
  logits = rng.standard_normal(7)
  ref_logits = logits + rng.standard_normal(7)
  logp, logq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  exact = _np_kl_per_token(logits, ref_logits)
  expectation = {name: float((np.exp(logp) * np.asarray(fn(jnp.asarray(logp, jnp.float32),
                                                           jnp.asarray(logq, jnp.float32)), np.float64)).sum())
                 for name, fn in kl.KL_ESTIMATORS.items()}
  for unbiased in ('k1', 'k3', 'k3_k2grad'):
    np.testing.assert_allclose(expectation[unbiased], exact, rtol=1e-4, err_msg=unbiased)
  assert abs(expectation['k2'] - exact) > 0.01 * exact
