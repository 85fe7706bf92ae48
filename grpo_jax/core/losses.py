"""The training losses as pure functions: the GRPO objective (DeepSeekMath eq. 3) and SFT's token NLL.

`grpo_loss` is the objective on per-token arrays; `grpo_objective` and `sft_loss` run a model's forward first
and are what the train step differentiates. Static choices of the loss (compile-time constants) travel in one
frozen `LossConfig`; values that change during training (beta, for a KL controller) come in as arrays in
`hparams`, so changing them never recompiles the step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grpo_jax.core.kl import KL_ESTIMATORS, get_kl_fn
from grpo_jax.core.logprobs import sequence_logprobs


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the GRPO loss computes; every field is static under jit. Built from config.rl in one place
  (pipeline/grpo.py: loss_config).

  clip_eps: epsilon of the ratio clip, min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).
  kl_estimator: 'k1' | 'k2' | 'k3' (core/kl.py), the per-token estimate of KL(pi_theta || pi_ref).
  kl_penalty: subtract beta * KL in the loss. False (beta = 0 in the config) drops the term from the compiled
    step; the logged 'kl' still measures the KL to the reference logprobs it is given.
  logprob_chunk: > 0: the LM head and logprobs run over this many completion positions at a time
    (core/logprobs.sequence_logprobs chunk_size); memory only, same values.
  remat: what each block keeps for the backward pass (models/transformer.REMAT_POLICIES); memory only.
  """
  clip_eps: float = 0.2
  kl_estimator: str = 'k3'
  kl_penalty: bool = True
  logprob_chunk: int = 0
  remat: str = 'none'

  def __post_init__(self):
    if not 0 < self.clip_eps < 1:
      raise ValueError(f'clip_eps must be in (0, 1), got {self.clip_eps}')
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f'unknown KL estimator {self.kl_estimator!r}; known: {sorted(KL_ESTIMATORS)}')


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip_eps: float = 0.2, beta: float | jax.Array = 0.04, kl_estimator: str = 'k3'
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative clipped surrogate with a KL penalty, averaged per output then over outputs.

  Per token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL, ratio = exp(logprobs - old).
  The objective is (1/N) sum_i (1/|o_i|) sum_t [that], N = num_prompts * G; the loss is its negative.

  Args:
    logprobs: [N, T] log pi_theta of the sampled tokens (differentiated).
    old_logprobs: [N, T] log pi_old (the sampling policy; constant).
    ref_logprobs: [N, T] log pi_ref (the frozen reference; constant).
    advantages: [N] one per output (outcome supervision) or [N, T] per token (process supervision).
    mask: [N, T] 1 on completion tokens, 0 on padding.
    clip_eps: epsilon of the ratio clip.
    beta: weight of the KL penalty, a Python number or a scalar array (traced: one compile for every value);
      a Python 0 leaves the term out.
    kl_estimator: 'k1', 'k2' or 'k3' (see kl.py).
  Returns:
    (scalar loss, metrics dict of scalars).
  """
  valid = mask.astype(bool)
  mask = mask.astype(jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  # Zero the padded slots before any exp: there a garbage logprob could overflow, and inf * 0 is NaN.
  logprobs = jnp.where(valid, logprobs, 0.0)
  old_logprobs = jnp.where(valid, jax.lax.stop_gradient(old_logprobs), 0.0)
  ref_logprobs = jnp.where(valid, jax.lax.stop_gradient(ref_logprobs), 0.0)
  advantages = jax.lax.stop_gradient(advantages)

  ratio = jnp.exp(logprobs - old_logprobs)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  per_token = jnp.minimum(unclipped, clipped)
  kl = get_kl_fn(kl_estimator)(logprobs, ref_logprobs)
  if not (isinstance(beta, (int, float)) and beta == 0):
    per_token = per_token - beta * kl

  lengths = jnp.maximum(mask.sum(axis=-1), 1.0)  # |o_i|; an empty output contributes 0
  per_output = (per_token * mask).sum(axis=-1) / lengths
  loss = -per_output.mean()

  num_tokens = jnp.maximum(mask.sum(), 1.0)
  token_mean = lambda x: (x * mask).sum() / num_tokens  # noqa: E731
  metrics = {
      'loss': loss,
      'kl': token_mean(kl),
      'ratio': token_mean(ratio),
      # Tokens whose gradient the clip zeroed: the clipped term won the min.
      'clip_frac': token_mean((clipped < unclipped).astype(jnp.float32)),
  }
  return loss, metrics


def grpo_objective(model, batch, hparams: dict[str, jax.Array], *, config: LossConfig
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss of `model` (the current policy) on a (mini)batch of rollouts; also reports its token entropy.

  batch: a rollout.Rollout (prompt_tokens, prompt_mask, completion_tokens, completion_mask [N, .],
    old_logprobs, ref_logprobs [N, c], advantages [N] or [N, c]).
  hparams: {'beta': scalar array} (read only when config.kl_penalty).
  """
  logprobs, entropy = sequence_logprobs(model, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                                        batch.completion_mask, return_entropy=True,
                                        chunk_size=config.logprob_chunk, remat=config.remat)
  beta = hparams['beta'] if config.kl_penalty else 0
  loss, metrics = grpo_loss(logprobs, batch.old_logprobs, batch.ref_logprobs, batch.advantages,
                            batch.completion_mask, clip_eps=config.clip_eps, beta=beta,
                            kl_estimator=config.kl_estimator)
  mask = batch.completion_mask.astype(jnp.float32)
  metrics['entropy'] = (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, metrics


def sft_loss(model, batch, hparams: dict[str, jax.Array] | None = None, *, logprob_chunk: int = 0,
             remat: str = 'none') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood per solution token (prompt tokens are not trained on).

  batch: a data.batches.SFTBatch ([b, p] left-padded prompts, [b, c] right-padded solutions + EOS).
  hparams: unused (the train step's signature). logprob_chunk and remat only trade compute for memory.
  """
  del hparams
  logprobs = sequence_logprobs(model, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                               batch.completion_mask, chunk_size=logprob_chunk, remat=remat)
  mask = batch.completion_mask.astype(jnp.float32)
  nll = -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return nll, {'nll': nll}


def sft_token_count(batch) -> jax.Array:
  """Solution tokens in a batch: the micro-batch weight under gradient accumulation, as sft_loss is a token
  mean (pipeline/train_state.make_train_step's micro_weight)."""
  return batch.completion_mask.sum().astype(jnp.float32)
