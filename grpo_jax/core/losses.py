"""The training losses as pure functions: the GRPO objective (DeepSeekMath eq. 3) and SFT's token NLL.

`grpo_loss` is the objective on per-token arrays; `grpo_objective` and `sft_loss` run a model's forward first
and are what the train step differentiates. Static choices of the loss (compile-time constants) travel in one
frozen `LossConfig`; values that change during training (beta, for a KL controller) come in as arrays in
`hparams`, so changing them never recompiles the step.

The loss's variants are picked by name from three registries, as advantages are (core/advantages.ADVANTAGES):
  POLICY_LOSSES       the per-token policy objective from the importance ratio and the advantage
                      ('clip': the paper's clipped surrogate)
  IMPORTANCE_RATIOS   the ratio each token's objective sees ('token': the paper's; 'sequence': GSPO)
  LOSS_AGGREGATIONS   how the per-token objective becomes one number ('sequence_mean': the paper's, ...)
A new variant is a function here and an entry in its registry; LossConfig accepts exactly the registries' names, and
the run config names it (config.rl.policy_loss, rl.importance_ratio, rl.loss_aggregation).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax.core.kl import KL_CHOICES, get_kl_fn, sequence_exact_kl
from grpo_jax.core.logprobs import sequence_logprobs

# ---------------------------------------------------------------------------------------------------------------
# Policy losses: fn(log_ratio [N, T], advantages [N, 1] or [N, T], mask [N, T], *, clip_eps, clip_eps_high,
# dual_clip) -> (objective [N, T], flags). objective is per token and maximized (grpo_loss adds the KL and entropy
# terms, then aggregates); flags maps metric names to [N, T] booleans whose mean over real tokens is logged. log_ratio
# is log pi_theta - log pi_old (differentiated through pi_theta; already the importance ratio's form); mask is 1.0 on
# real tokens, 0.0 on padding (where log_ratio is 0). A loss that needs a per-output reduction (a geometric mean over
# each output's tokens, say) takes it over the mask and broadcasts the result back over the output's tokens.


def clip_objective(log_ratio: jax.Array, advantages: jax.Array, mask: jax.Array, *, clip_eps: float,
                   clip_eps_high: float, dual_clip: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's clipped surrogate: min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) per token; with
  dual_clip = c > 1 and A < 0 the min is floored at c * A (Ye et al. 2020).
  Flags: clip_frac_low / clip_frac_high, the tokens whose gradient the lower / upper clip zeroed (A < 0 with ratio <
  1 - eps, A > 0 with ratio > 1 + eps_high), clip_frac their union; clip_frac_dual, those the dual clip floored."""
  del mask  # every token's objective is its own
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * advantages
  per_token = jnp.minimum(unclipped, clipped)
  clip_won = clipped < unclipped  # the clipped term won the min: that token's gradient is zero
  dual_floored = jnp.zeros(log_ratio.shape, bool)
  if dual_clip:
    # For A < 0 the min picks ratio * A once ratio > 1 + eps, unbounded below as the ratio grows.
    floor = dual_clip * advantages
    dual_floored = (advantages < 0) & (per_token < floor)
    per_token = jnp.where(advantages < 0, jnp.maximum(per_token, floor), per_token)
  # clip_won with ratio above 1 is the upper clip (A > 0), below 1 the lower one (A < 0); at ratio 1 the clip is
  # inactive, so clip_frac is their sum.
  return per_token, {'clip_frac': clip_won, 'clip_frac_low': clip_won & (ratio < 1.0),
                     'clip_frac_high': clip_won & (ratio > 1.0), 'clip_frac_dual': dual_floored}


POLICY_LOSSES: dict[str, Callable[..., tuple[jax.Array, dict[str, jax.Array]]]] = {
    'clip': clip_objective,  # DeepSeekMath eq. 3 (PPO's surrogate); with clip_eps_high DAPO's clip-higher
}


# ---------------------------------------------------------------------------------------------------------------
# Importance ratios: fn(log_ratio [N, T], mask [N, T]) -> the log ratio each token's objective sees [N, T].


def token_log_ratio(log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
  """Each token's own ratio pi_theta / pi_old (the paper)."""
  del mask
  return log_ratio


def sequence_log_ratio(log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
  """GSPO: one length-normalized ratio per output, exp(mean over its tokens of the log ratio), for all its tokens.
  It moves far less than a token's ratio: the GSPO paper clips it with epsilons of order 1e-4, not 0.2."""
  lengths = jnp.maximum(mask.sum(axis=-1), 1.0)  # |o_i|; an empty output has ratio 1
  return jnp.broadcast_to(((log_ratio * mask).sum(axis=-1) / lengths)[:, None], log_ratio.shape)


IMPORTANCE_RATIOS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'token': token_log_ratio, 'sequence': sequence_log_ratio}


# ---------------------------------------------------------------------------------------------------------------
# Loss aggregations: fn(objective [N, T], mask [N, T], *, max_len) -> the scalar objective. With x_it the per-token
# objective, m_it the mask, N outputs and T = max_len (the completion budget; 0 = the mask's time dimension, which is
# narrower when the batch was cut to a length bucket: rollout/trim.py). An empty output (|o_i| = 0) contributes 0
# and still counts in N.


def sequence_mean(objective: jax.Array, mask: jax.Array, *, max_len: int = 0) -> jax.Array:
  """(1/N) sum_i (1/|o_i|) sum_t m_it x_it: the paper's (a token of a long output counts less)."""
  del max_len
  lengths = jnp.maximum(mask.sum(axis=-1), 1.0)
  return ((objective * mask).sum(axis=-1) / lengths).mean()


def token_mean(objective: jax.Array, mask: jax.Array, *, max_len: int = 0) -> jax.Array:
  """sum_it m_it x_it / sum_it m_it: DAPO's (every token of the batch counts the same)."""
  del max_len
  return (objective * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def constant_normalizer(objective: jax.Array, mask: jax.Array, *, max_len: int = 0) -> jax.Array:
  """sum_it m_it x_it / (N * T): Dr. GRPO's (no length-dependent normalizer)."""
  return (objective * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def sequence_sum(objective: jax.Array, mask: jax.Array, *, max_len: int = 0) -> jax.Array:
  """(1/N) sum_i sum_t m_it x_it."""
  del max_len
  return (objective * mask).sum(axis=-1).mean()


LOSS_AGGREGATIONS: dict[str, Callable[..., jax.Array]] = {
    'sequence_mean': sequence_mean, 'token_mean': token_mean, 'constant': constant_normalizer,
    'sequence_sum': sequence_sum}


def completion_token_count(batch) -> jax.Array:
  """The completion tokens of a batch (those with completion_mask 1), as float32: the micro-batch weight under
  gradient accumulation of a loss that is a mean over the batch's tokens (sft_loss, the 'token_mean' aggregation;
  pipeline/train_state.make_train_step's micro_weight)."""
  return batch.completion_mask.sum().astype(jnp.float32)


# An aggregation that is a mean over the batch's tokens -> its micro-batch weight; the others are means over outputs
# (or a sum over N * T), which equal micro-batches weigh equally.
MICRO_WEIGHTS: dict[str, Callable[[Any], jax.Array]] = {'token_mean': completion_token_count}


def check_known(what: str, name: str, known) -> None:
  """One line naming `what`'s unknown `name` and listing the known ones."""
  if name not in known:
    raise ValueError(f'{what}={name!r} is unknown; known: {sorted(known)}')


def get_policy_loss(name: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  check_known('policy_loss', name, POLICY_LOSSES)
  return POLICY_LOSSES[name]


def get_importance_ratio(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  check_known('importance_ratio', name, IMPORTANCE_RATIOS)
  return IMPORTANCE_RATIOS[name]


def get_loss_aggregation(name: str) -> Callable[..., jax.Array]:
  check_known('loss_aggregation', name, LOSS_AGGREGATIONS)
  return LOSS_AGGREGATIONS[name]


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the GRPO loss computes; every field is static under jit. Built from config.rl in one place
  (pipeline/grpo.py: loss_config) and checked here, once: each error starts with the offending field's name (which
  loss_config turns into the config key). The defaults are the paper's objective (DeepSeekMath eq. 3).

  policy_loss: the per-token policy objective (POLICY_LOSSES): 'clip', min(ratio * A, clip(ratio, 1 - eps,
    1 + eps_high) * A).
  clip_eps: epsilon of the ratio clip; the lower one.
  clip_eps_high: the upper epsilon (clip-higher, DAPO); 0 = clip_eps (a symmetric clip).
  dual_clip: c > 1: for A < 0 the per-token objective is max(min(ratio * A, clip(ratio) * A), c * A) (Ye et al.
    2020), which bounds what one token with a huge ratio can contribute; 0 = off.
  kl_estimator: 'k1' | 'k2' | 'k3' | 'k3_k2grad' (core/kl.py), the per-token estimate of KL(pi_theta || pi_ref); or
    'exact': the full-vocabulary KL at each position (core/kl.sequence_exact_kl), which needs reference_model and
    the reference's params as hparams['ref_params'] (with kl_penalty; not with kl_in_reward).
  kl_penalty: apply beta * KL. False (beta = 0 in the config) drops the term from the compiled step; the logged
    'kl' still measures the KL to the reference logprobs it is given.
  kl_in_reward: False: subtract beta * KL(pi_theta || pi_ref) in the loss (GRPO). True: fold the KL of pi_old into
    the per-token advantages instead (PPO-style; see grpo_loss), with no gradient through it.
  loss_aggregation: how per-token terms become one number (LOSS_AGGREGATIONS).
  importance_ratio: 'token' (per-token ratios, the paper) | 'sequence' (GSPO; IMPORTANCE_RATIOS).
  entropy_coef: adds entropy_coef * the token entropy of pi_theta to the objective (an entropy bonus); 0 = off.
  logprob_chunk: > 0: the LM head and logprobs run over this many completion positions at a time
    (core/logprobs.sequence_logprobs chunk_size); memory only, same values.
  remat: what each block keeps for the backward pass (models/transformer.REMAT_POLICIES); memory only.
  shared_prompt_group: G > 1: the batch's rows come in groups of G sharing one prompt, and the policy forward runs
    each prompt once (core/logprobs.sequence_logprobs group_size); compute only, same values. 1 = every row's
    prompt runs. The exact-KL term (kl_estimator 'exact') still runs every row's prompt.
  pack_rows: R > 0 (with shared_prompt_group): each group's outputs run packed into R rows (core/packing.py; R at
    least packing.rows_needed of the batch); compute only, same values. 0 = one row per output.
  logits_filter: None, or a function logits [..., V] -> logits [..., V] (the sampler's temperature / top-k / top-p,
    rollout/reference.sampling_filter): pi_theta's logprobs and entropy are then those of the filtered
    distribution the sampler draws from (rl.trainer_sampling_filters). A token the filter excludes (logprob -inf)
    is left out of the loss, as is one whose old logprob is -inf; one whose reference logprob is -inf adds no KL
    in the loss (with kl_in_reward that token's folded KL is not defined: do not combine the two).
  """
  policy_loss: str = 'clip'
  clip_eps: float = 0.2
  clip_eps_high: float = 0.0
  dual_clip: float = 0.0
  kl_estimator: str = 'k3'
  kl_penalty: bool = True
  kl_in_reward: bool = False
  loss_aggregation: str = 'sequence_mean'
  importance_ratio: str = 'token'
  entropy_coef: float = 0.0
  logprob_chunk: int = 0
  remat: str = 'none'
  shared_prompt_group: int = 1
  pack_rows: int = 0
  max_len: int = 0  # the completion budget T of 'constant' aggregation (grpo_loss); 0 = the batch's width
  logits_filter: Callable[[jax.Array], jax.Array] | None = None
  reference_model: Callable[[Any], Any] | None = None  # 'exact': ref params -> the reference model

  def __post_init__(self):
    get_policy_loss(self.policy_loss)
    get_importance_ratio(self.importance_ratio)
    get_loss_aggregation(self.loss_aggregation)
    check_known('kl_estimator', self.kl_estimator, KL_CHOICES)
    self._check_clips()
    self._check_terms()
    if not isinstance(self.shared_prompt_group, int) or self.shared_prompt_group < 1:
      raise ValueError(f'shared_prompt_group must be an int >= 1 (1 = off), got {self.shared_prompt_group!r}')
    if not isinstance(self.pack_rows, int) or self.pack_rows < 0 or (self.pack_rows and self.shared_prompt_group < 2):
      raise ValueError(f'pack_rows must be an int >= 0 (0 = off), > 0 only with shared_prompt_group > 1; got '
                       f'{self.pack_rows!r} with shared_prompt_group={self.shared_prompt_group}')

  def _check_clips(self) -> None:
    if not _is_number(self.clip_eps) or not 0 < self.clip_eps < 1:
      raise ValueError(f'clip_eps must be in (0, 1), got {self.clip_eps!r}')
    high = self.clip_eps_high
    if not _is_number(high) or high < 0 or (high and high < self.clip_eps):
      raise ValueError(f'clip_eps_high={high!r} must be 0 (= clip_eps, a symmetric clip) or >= clip_eps='
                       f'{self.clip_eps} (the lower epsilon)')
    dual = self.dual_clip
    if not _is_number(dual) or not (dual == 0 or dual > 1):
      raise ValueError(f'dual_clip={dual!r} must be 0 (off) or > 1: the floor c * A (A < 0) zeroes the gradient of '
                       'every token whose ratio is above c, on-policy tokens (ratio 1) too when c <= 1')

  def _check_terms(self) -> None:
    for name in ('kl_penalty', 'kl_in_reward'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')
    if not _is_number(self.entropy_coef):
      raise ValueError(f'entropy_coef must be a number (0 = off), got {self.entropy_coef!r}')
    if self.kl_estimator == 'exact' and (self.kl_in_reward or not self.kl_penalty or self.logits_filter is not None):
      raise ValueError("kl_estimator='exact' is the loss's KL term: it needs kl_penalty, and neither kl_in_reward nor "
                       'logits_filter')

  @property
  def upper_clip_eps(self) -> float:
    return self.clip_eps_high or self.clip_eps


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip_eps: float = 0.2, beta: float | jax.Array = 0.04, kl_estimator: str = 'k3',
              clip_eps_high: float | None = None, dual_clip: float = 0.0, loss_aggregation: str = 'sequence_mean',
              importance_ratio: str = 'token', kl_in_reward: bool = False, entropy: jax.Array | None = None,
              entropy_coef: float = 0.0, kl_values: jax.Array | None = None, max_len: int = 0,
              policy_loss: str = 'clip') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative policy objective with a KL penalty; by default the paper's clipped surrogate averaged per output, then
  over outputs.

  Per token: x_t = policy_loss's objective (POLICY_LOSSES; 'clip': min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high)
  * A), with dual_clip = c > 1 and A < 0 floored at c * A) - beta * KL (+ entropy_coef * entropy), ratio =
  exp(logprobs - old) in importance_ratio's form ('sequence', GSPO: exp(mean over the output's tokens of (logprobs -
  old)), one value for all its tokens; with one advantage per output and 'sequence_mean' the objective is GSPO's
  (1/N) sum_i min(s_i A_i, clip(s_i) A_i)).
  With kl_in_reward the loss has no KL term; token t's advantage is A_t - beta * sum_{t' >= t} KL_t', KL_t' the
  kl_estimator's value at the sampled token's pi_old and reference logprobs (a constant: pi_old is fixed, like the
  reward), as a per-token reward -beta * KL_t' credited with gamma = lambda = 1 in RLHF PPO.
  loss_aggregation (LOSS_AGGREGATIONS) makes the x_t one number: 'sequence_mean' (the paper), 'token_mean' (DAPO),
  'constant' (Dr. GRPO: over N * max_len), 'sequence_sum'; the loss is its negative.

  Args:
    logprobs: [N, T] log pi_theta of the sampled tokens (differentiated).
    old_logprobs: [N, T] log pi_old (the sampling policy; constant).
    ref_logprobs: [N, T] log pi_ref (the frozen reference; constant).
    advantages: [N] one per output (outcome supervision) or [N, T] per token (process supervision).
    mask: [N, T] 1 on completion tokens, 0 on padding.
    clip_eps: the lower epsilon of the ratio clip (a Python number or a traced scalar).
    beta: weight of the KL penalty, a Python number or a scalar array (traced: one compile for every value);
      a Python 0 leaves the term out.
    kl_estimator: 'k1', 'k2', 'k3' or 'k3_k2grad' (see kl.py).
    clip_eps_high: the upper epsilon; None = clip_eps.
    dual_clip: a Python number, c > 1, or 0 (off).
    loss_aggregation, importance_ratio, policy_loss: registry names (static).
    kl_in_reward: static; see above.
    entropy: [N, T] token entropy of pi_theta (differentiated), needed when entropy_coef != 0.
    entropy_coef: a Python number; 0 leaves the term out.
    kl_values: [N, T] the per-token KL itself (kl_estimator 'exact': core/kl.sequence_exact_kl), differentiated,
      in place of an estimator's value at the sampled tokens; not with kl_in_reward.
    max_len: T of 'constant' (static); 0 = mask.shape[1].
  Returns:
    (scalar loss, metrics dict of scalars): loss; kl (to the reference, token mean); ratio, ratio_min, ratio_max
    (over real tokens; 1 when there is none); and the token means of the policy loss's flags ('clip': clip_frac,
    clip_frac_low, clip_frac_high, clip_frac_dual; see clip_objective).
  """
  objective_fn = get_policy_loss(policy_loss)
  ratio_fn = get_importance_ratio(importance_ratio)
  aggregate = get_loss_aggregation(loss_aggregation)
  check_known('kl_estimator', kl_estimator, KL_CHOICES)
  if (kl_estimator == 'exact') != (kl_values is not None) or (kl_values is not None and kl_in_reward):
    raise ValueError("kl_estimator='exact' goes with kl_values (and not kl_in_reward), and kl_values with 'exact'")
  kl_fn = None if kl_values is not None else get_kl_fn(kl_estimator)
  valid = mask.astype(bool)
  mask = mask.astype(jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  # Zero the padded slots before any exp: there a garbage logprob could overflow, and inf * 0 is NaN.
  logprobs = jnp.where(valid, logprobs, 0.0)
  old_logprobs = jnp.where(valid, jax.lax.stop_gradient(old_logprobs), 0.0)
  ref_logprobs = jnp.where(valid, jax.lax.stop_gradient(ref_logprobs), 0.0)
  advantages = jax.lax.stop_gradient(advantages)
  penalize = not (isinstance(beta, (int, float)) and beta == 0)
  if kl_in_reward and penalize:
    kl_old = jnp.where(valid, kl_fn(old_logprobs, ref_logprobs), 0.0)
    kl_to_go = jnp.flip(jnp.cumsum(jnp.flip(kl_old, axis=-1), axis=-1), axis=-1)  # sum over t' >= t
    advantages = advantages - jax.lax.stop_gradient(beta * kl_to_go)

  log_ratio = ratio_fn(logprobs - old_logprobs, mask)
  ratio = jnp.exp(log_ratio)
  per_token, flags = objective_fn(log_ratio, advantages, mask, clip_eps=clip_eps,
                                  clip_eps_high=clip_eps if clip_eps_high is None else clip_eps_high,
                                  dual_clip=dual_clip)
  kl = kl_fn(logprobs, ref_logprobs) if kl_values is None else jnp.where(valid, kl_values, 0.0)
  if penalize and not kl_in_reward:
    per_token = per_token - beta * kl
  if entropy_coef:
    per_token = per_token + entropy_coef * jnp.where(valid, entropy, 0.0)
  loss = -aggregate(per_token, mask, max_len=max_len)

  num_tokens = jnp.maximum(mask.sum(), 1.0)
  token_mean_of = lambda x: (x * mask).sum() / num_tokens  # noqa: E731
  any_token = valid.any()
  metrics = {
      'loss': loss,
      'kl': token_mean_of(kl),
      'ratio': token_mean_of(ratio),
      'ratio_min': jnp.where(any_token, jnp.min(jnp.where(valid, ratio, jnp.inf)), 1.0),
      'ratio_max': jnp.where(any_token, jnp.max(jnp.where(valid, ratio, -jnp.inf)), 1.0),
      **{name: token_mean_of(flag.astype(jnp.float32)) for name, flag in flags.items()},
  }
  return loss, metrics


def grpo_objective(model, batch, hparams: dict[str, jax.Array], *, config: LossConfig
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss of `model` (the current policy) on a (mini)batch of rollouts; also reports its token entropy.

  batch: a rollout.Rollout (prompt_tokens, prompt_mask, completion_tokens, completion_mask [N, .],
    old_logprobs, ref_logprobs [N, c], advantages [N] or [N, c]).
  hparams: {'beta': scalar array} (read only when config.kl_penalty); with kl_estimator 'exact' also 'ref_params',
    the reference's params, which config.reference_model turns into a model.
  """
  if config.logits_filter is not None:
    model = FilteredLogits(model, config.logits_filter)
  logprobs, entropy = sequence_logprobs(model, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                                        batch.completion_mask, return_entropy=True,
                                        chunk_size=config.logprob_chunk, remat=config.remat,
                                        group_size=config.shared_prompt_group, pack_rows=config.pack_rows)
  loss_mask, ref_logprobs = batch.completion_mask, batch.ref_logprobs
  if config.logits_filter is not None:  # tokens outside either filtered support: no ratio, no loss (see LossConfig)
    inside = jnp.isfinite(jax.lax.stop_gradient(logprobs)) & jnp.isfinite(batch.old_logprobs)
    loss_mask = loss_mask * inside.astype(loss_mask.dtype)
    logprobs = jnp.where(inside, logprobs, 0.0)
    # A token outside the filtered reference's support would make the KL infinite: it adds none (value, gradient).
    ref_logprobs = jnp.where(jnp.isfinite(ref_logprobs), ref_logprobs, jax.lax.stop_gradient(logprobs))
  beta = hparams['beta'] if config.kl_penalty else 0
  kl_values = None
  if config.kl_estimator == 'exact':
    if config.reference_model is None or 'ref_params' not in hparams:
      raise ValueError("kl_estimator='exact' needs LossConfig.reference_model and hparams['ref_params']")
    kl_values = sequence_exact_kl(model, config.reference_model(hparams['ref_params']), batch.prompt_tokens,
                                  batch.prompt_mask, batch.completion_tokens, batch.completion_mask,
                                  chunk_size=config.logprob_chunk, remat=config.remat)
  loss, metrics = grpo_loss(logprobs, batch.old_logprobs, ref_logprobs, batch.advantages,
                            loss_mask, clip_eps=config.clip_eps, beta=beta,
                            kl_estimator=config.kl_estimator, clip_eps_high=config.upper_clip_eps,
                            dual_clip=config.dual_clip, loss_aggregation=config.loss_aggregation,
                            importance_ratio=config.importance_ratio, kl_in_reward=config.kl_in_reward,
                            entropy=entropy, entropy_coef=config.entropy_coef, kl_values=kl_values,
                            max_len=config.max_len, policy_loss=config.policy_loss)
  mask = batch.completion_mask.astype(jnp.float32)
  metrics['entropy'] = (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, metrics


class FilteredLogits:
  """A model whose logits pass through `logits_filter` (logits [..., V] -> [..., V]), for sequence_logprobs: the
  forward and hidden states are the model's own, the LM head's output is filtered, chunked or not."""

  def __init__(self, model, logits_filter: Callable[[jax.Array], jax.Array]):
    self.model, self.logits_filter = model, logits_filter

  def __call__(self, *args, **kwargs) -> jax.Array:
    return self.logits_filter(self.model(*args, **kwargs))

  def hidden_states(self, *args, **kwargs) -> jax.Array:
    return self.model.hidden_states(*args, **kwargs)

  def grouped_hidden_states(self, *args, **kwargs) -> tuple[jax.Array, jax.Array]:
    return self.model.grouped_hidden_states(*args, **kwargs)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    return self.logits_filter(self.model.logits_from_hidden(hidden))


def tis_weights(trainer_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array, *, cap: float
                ) -> jax.Array:
  """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
  RL training"): each token's weight min(pi_trainer(x) / pi_sampler(x), cap), correcting for the sampler's numerics
  drawing from a slightly different pi_old than the trainer's. [N, T] logprobs and mask -> [N, T] float32, 0 on
  padding."""
  valid = mask.astype(bool)
  log_ratio = jnp.where(valid, trainer_logprobs - sampler_logprobs, 0.0)
  return jnp.where(valid, jnp.minimum(jnp.exp(log_ratio), cap), 0.0).astype(jnp.float32)


def mean_abs_diff(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over real tokens of |a - b| ([N, T] each; 0 when there is none): the logged sampler-vs-trainer
  logprob gap."""
  valid = mask.astype(bool)
  total = jnp.sum(jnp.where(valid, jnp.abs(a - b), 0.0))
  return total / jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def grpo_micro_weight(config: LossConfig) -> Callable[[Any], jax.Array] | None:
  """The micro-batch weight that makes gradient accumulation equal one big step for this loss
  (pipeline/train_state.make_train_step's micro_weight): a batch token mean ('token_mean') weighs micro-batches by
  their tokens; every other aggregation is a mean over outputs (or a sum over N * T for 'constant'), which equal
  micro-batches weigh equally (None). See MICRO_WEIGHTS."""
  return MICRO_WEIGHTS.get(config.loss_aggregation)


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
