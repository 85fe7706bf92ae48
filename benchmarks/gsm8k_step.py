"""Our side of the GSM8K-shaped benchmark (benchmarks/gsm8k_workload.py): its prompts as the trainer's batch, a
wrapper that forces each completion's length on the trainer's own sampler, and the FLOPs the step must do.

Forcing lengths: grpo_jax/rollout/sampling.py has no logits hook, so the wrapped sampler is built never to stop at a
token (eos_ids (-1,)) and is given each row's forced length as its length cap (max_lengths): row r ends inside the
sampler after lengths[r] tokens, as it would at a sampled EOS, so a compacting sampler (config.decode_buckets) stops
decoding it. The output is then cut as before: the last kept token replaced by EOS, the rest pad with mask 0. The
batch decodes to its longest row, as with EOS sampled in the loop. What differs from a real EOS: the logprob kept at
the forced EOS (and at an EOS the sampler drew earlier, replaced by `replace_id` because EOS is suppressed there) is
that of the token the sampler drew, not of the token now in its place; the loss runs on the same shapes, so the
timing does not change.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.models.flops import forward_flops
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.rollout.sampling import Completions


def prompt_split(tokenizer, rows: Sequence[tuple[str, str]], width: int) -> TokenizedSplit:
  """(text, answer) rows as the trainer's prompt batch: <bos> + one token per character, left-padded to `width`
  (TRL pads to each step's longest, which the workload makes `width` in every step)."""
  ids = [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)['input_ids'] for text, _ in rows]
  return left_padded(ids, [answer for _, answer in rows], width=width, pad_id=tokenizer.pad_token_id)


def left_padded(ids: Sequence[Sequence[int]], answers: Sequence[str], *, width: int, pad_id: int) -> TokenizedSplit:
  """Prompt token ids (a real model's chat prompts: gsm8k_workload.chat_prompts) as the trainer's prompt batch,
  left-padded to `width` [n, width] with mask 1 on the prompt's tokens."""
  if max(map(len, ids)) > width:
    raise ValueError(f'a prompt has {max(map(len, ids))} tokens, more than width={width}')
  tokens = np.full((len(ids), width), pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):
    tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
  empty = np.zeros((len(ids), 1), np.int32)
  return TokenizedSplit(tokens, mask, empty, empty, list(answers))


@functools.partial(jax.jit, static_argnames=('eos_id', 'pad_id', 'replace_id'))
def force_lengths(out: Completions, lengths: jax.Array, *, eos_id: int, pad_id: int, replace_id: int) -> Completions:
  """Completions [b, c] cut so that row r has lengths[r] tokens (EOS included, 1 <= lengths[r] <= c): token
  lengths[r] - 1 is EOS, tokens after it pad (mask 0, logprob 0), and an EOS drawn before it becomes replace_id.
  lengths [b] int."""
  position = jnp.arange(out.tokens.shape[1])[None, :]  # [1, c]
  end = lengths[:, None]  # [b, 1]
  keep = position < end
  tokens = jnp.where(out.tokens == eos_id, replace_id, out.tokens)
  tokens = jnp.where(position == end - 1, eos_id, jnp.where(keep, tokens, pad_id))
  return Completions(tokens.astype(out.tokens.dtype), keep.astype(out.mask.dtype),
                     jnp.where(keep, out.logprobs, 0.0).astype(out.logprobs.dtype))


def forced_length_sampler(sampler: Callable, lengths: Sequence[int], *, eos_id: int, pad_id: int,
                          replace_id: int, budget: int = 0) -> Callable:
  """sampler(params, prompt_tokens [P, p], prompt_mask, rng) -> Completions [P*G, c], with row r ended after
  lengths[r] tokens (the sampler's max_lengths) and cut there (force_lengths). `sampler` must not stop rows at a
  token itself (built with eos_ids (-1,)). budget > c: the completions padded to [P*G, budget], as a sampler with
  that budget returns them once every row has stopped by column c."""
  lengths = np.asarray(lengths, np.int32)

  def sample(params, prompt_tokens, prompt_mask, rng):
    out = sampler(params, prompt_tokens, prompt_mask, rng, lengths)  # the sampler checks there is one per row
    if lengths.max() > out.tokens.shape[1] or lengths.min() < 1:
      raise ValueError(f'lengths for {lengths.shape[0]} rows in [1, {out.tokens.shape[1]}] needed; got '
                       f'{lengths.shape[0]} in [{lengths.min()}, {lengths.max()}]')
    out = force_lengths(out, lengths, eos_id=eos_id, pad_id=pad_id, replace_id=replace_id)
    extra = max(budget - out.tokens.shape[1], 0)
    pad = lambda x, value: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)  # noqa: E731
    return Completions(pad(out.tokens, pad_id), pad(out.mask, 0), pad(out.logprobs, 0.0)) if extra else out

  return sample


def must_do_flops(cfg: ModelConfig, *, prompt_lens: Sequence[int], completion_lens: Sequence[int],
                  group_size: int, reference: bool, num_epochs: int = 1) -> dict[str, float]:
  """Model FLOPs one GRPO step cannot avoid (grpo_jax/models/flops.py's convention), by phase, and their 'total'.

  prompt_lens [P]: real prompt tokens (no padding); completion_lens [P*G]: tokens up to and including each row's
  EOS, groups contiguous. Each prompt's tokens run once per group (not G times): in the prefill, and in every
  training forward (a shared-prompt forward whose completions attend to the prompt's keys). Row r of group i:
      forward   = sum_i F(1, p_i, 0) + sum_r F(1, L_r, p_i)
      prefill   = sum_i F(1, p_i, 0)
      decode    = sum_r F(1, max L, p_i)    the batch decodes until its longest row ends
      reference = forward (when beta > 0);  policy = 3 * num_epochs * forward
  """
  prompt_lens, completion_lens = list(prompt_lens), list(completion_lens)
  if len(completion_lens) != len(prompt_lens) * group_size:
    raise ValueError(f'{len(completion_lens)} completion lengths for {len(prompt_lens)} prompts x G={group_size}')
  prompt_of = [prompt_lens[r // group_size] for r in range(len(completion_lens))]
  prefill = sum(forward_flops(cfg, batch=1, new_tokens=p) for p in prompt_lens)
  forward = prefill + sum(forward_flops(cfg, batch=1, new_tokens=n, cached=p)
                          for n, p in zip(completion_lens, prompt_of, strict=True))
  longest = max(completion_lens)
  phases = {'prefill': prefill,
            'decode': sum(forward_flops(cfg, batch=1, new_tokens=longest, cached=p) for p in prompt_of),
            'reference_forward': forward if reference else 0.0,
            'policy_forward_backward': 3.0 * num_epochs * forward}
  phases['total'] = sum(phases.values())
  return phases
