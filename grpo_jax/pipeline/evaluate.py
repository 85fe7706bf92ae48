"""Evaluation: pass@1 (greedy or sampled) and maj@k on tokenized splits, and loading a policy to evaluate.

A policy comes from a Hugging Face model directory or from a training workdir's latest Orbax checkpoint.
Used by the trainer (held-out accuracy) and by the `eval` / `generate` commands.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import decode, load_tokenizer
from grpo_jax.models import hf, lora
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import checkpoint, stages
from grpo_jax.pipeline.stages import Role
from grpo_jax.rewards.registry import RewardFn, score


def _decode_batches(sampler: Callable, params, split: TokenizedSplit, tokenizer, *, batch_size: int, rng,
                    group_size: int = 1, first_batch: int = 0, desc: str | None = None) -> Iterator[list[str]]:
  """Each decoding batch's texts, from batch `first_batch` on: group_size per real example (the padding rows of the
  last batch dropped), each example's group contiguous. Batch i is decoded with fold_in(rng, i) whichever batch comes
  first, so a pass that starts late decodes what the same batches of a whole pass would."""
  n = len(split)
  starts = range(first_batch * batch_size, n, batch_size)
  bar = tqdm(starts, desc=desc, disable=desc is None, dynamic_ncols=True, initial=first_batch,
             total=first_batch + len(starts))
  for start in bar:
    idx = np.arange(start, start + batch_size) % n  # the last batch wraps around: one shape, one compile
    out = sampler(params, split.prompt_tokens[idx], split.prompt_mask[idx],
                  jax.random.fold_in(rng, start // batch_size))
    batch = decode(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))
    yield batch[:min(batch_size, n - start) * group_size]


def sample_texts(sampler: Callable, params, split: TokenizedSplit, tokenizer, *, batch_size: int, rng,
                 group_size: int = 1, desc: str | None = None) -> list[str]:
  """Decode `group_size` completions per example, in fixed-size batches of prompts (the last is padded by
  wrapping around, so one compile). sampler(params, prompt_tokens, prompt_mask, rng) -> Completions.
  Returns len(split) * group_size texts, each example's group contiguous.
  """
  batches = _decode_batches(sampler, params, split, tokenizer, batch_size=batch_size, rng=rng, group_size=group_size,
                            desc=desc)
  return [text for batch in batches for text in batch]


def decode_records(sampler: Callable, params, split: TokenizedSplit, tokenizer, *, batch_size: int, rng,
                   group_size: int = 1, reduce: Callable[[list[str]], list] | None = None, done: Sequence = (),
                   on_batch: Callable[[list], None] | None = None, desc: str | None = None) -> list:
  """One record per example, decoded batch by batch so that an interrupted pass can resume.

  reduce(a batch's texts, as sample_texts orders them) -> that batch's records, one per example (default: the texts,
  for group_size 1). `done` holds the records of the first batches, saved by an interrupted call with the same
  arguments: those batches are not decoded again. on_batch(records so far) runs after each decoded batch, e.g. to
  save them. The records equal an uninterrupted call's (see _decode_batches).
  """
  n = len(split)
  if reduce is None and group_size != 1:
    raise ValueError(f'group_size={group_size} needs a reduce to one record per example')
  if len(done) > n or (len(done) < n and len(done) % batch_size):
    raise ValueError(f'{len(done)} records done of {n} is not a whole number of batches of {batch_size}: resume '
                     'with the batch size that saved them')
  records = list(done)
  first_batch = -(-len(records) // batch_size)  # all of them once every example is done
  for texts in _decode_batches(sampler, params, split, tokenizer, batch_size=batch_size, rng=rng,
                               group_size=group_size, first_batch=first_batch, desc=desc):
    records.extend(texts if reduce is None else reduce(texts))
    if on_batch is not None:
      on_batch(records)
  return records


def pass_at_1(sampler: Callable, params, split: TokenizedSplit, tokenizer, reward_fn: RewardFn, *, batch_size: int,
              rng, verifier: RewardFn | None = None, desc: str | None = None, keep_completions: bool = False,
              keep_scores: bool = False, done: Sequence[str] = (),
              on_batch: Callable[[list[str]], None] | None = None) -> dict:
  """pass@1: one completion of every example from `sampler` (greedy, or sampled with group_size 1, as the caller
  built it), scored: accuracy (the fraction the verifier, default the reward, scores >= 1), mean reward, verifier
  failures (timeouts / errors, scored 0) and the first completion as a sample; with keep_completions, also every
  completion and whether it is correct ('completions', 'correct'); with keep_scores, each example's verifier score
  ('scores').

  Resuming (decode_records): `done` = the completions of the first batches, on_batch(completions so far).
  """
  texts = decode_records(sampler, params, split, tokenizer, batch_size=batch_size, rng=rng, done=done,
                         on_batch=on_batch, desc=desc)
  rewards, failures = score(reward_fn, texts, split.answers)
  correct = rewards if verifier is None else score(verifier, texts, split.answers)[0]
  out = {'accuracy': float((correct >= 1).mean()), 'reward': float(rewards.mean()),
         'reward_failures': failures, 'sample': texts[0]}
  if keep_completions:
    out.update(completions=texts, correct=[bool(c >= 1) for c in correct])
  if keep_scores:
    out['scores'] = [float(c) for c in correct]
  return out


def vote(answers: Sequence[str], same: Callable[[str, str], bool] | None = None) -> str | None:
  """The answer most of `answers` agree on, answers that same(a, b) calls equal voting together (default: equal
  strings), so '0.5' and '1/2' are one vote under a numeric verifier's equivalence. A class is named by its first
  answer; ties go to the class seen first; None for no answers.

  Identical strings are counted first, so `same` (math-verify for MATH, a worker-pool round trip) is asked once per
  distinct answer and class."""
  classes: list[list] = []  # [first answer, votes], in the order first seen
  for answer, n in collections.Counter(answers).items():
    for c in classes:
      if same is not None and same(c[0], answer):
        c[1] += n
        break
    else:
      classes.append([answer, n])
  return max(classes, key=lambda c: c[1])[0] if classes else None


def majority_answers(texts: list[str], k: int, extract: Callable[[str], str | None],
                     same: Callable[[str, str], bool] | None = None) -> list[str | None]:
  """The voted answer (`vote`) of each group of k texts over their extracted, whitespace-stripped answers; None when
  no text of the group has an answer."""
  out = []
  for g in range(0, len(texts), k):
    out.append(vote([a.strip() for a in map(extract, texts[g:g + k]) if a is not None and a.strip()], same))
  return out


def maj_at_k(sampler: Callable, params, split: TokenizedSplit, tokenizer, verifier: RewardFn,
             extract: Callable[[str], str | None], *, same: Callable[[str, str], bool], k: int, batch_size: int, rng,
             desc: str | None = None, done: Sequence[str | None] = (),
             on_batch: Callable[[list[str | None]], None] | None = None) -> dict:
  """maj@k: sample k completions per problem, vote over their extracted final answers, verify the winner.

  `sampler` must produce k completions per prompt (make_sampler(..., group_size=k)); batch_size counts prompts.
  same(a, b): whether two extracted answers are one answer, the verifier's equivalence
  (rewards.verifiers.answers_equivalent), so that equivalent forms of an answer vote together.
  Resuming (decode_records): `done` = the voted answers of the first batches, on_batch(voted answers so far); each
  batch is voted on as it comes, so what is saved is one answer per problem, not k completions.
  """
  voted = decode_records(sampler, params, split, tokenizer, batch_size=batch_size, rng=rng, group_size=k,
                         reduce=lambda texts: majority_answers(texts, k, extract, same), done=done, on_batch=on_batch,
                         desc=desc)
  # The winner is verified as a completion that states it in the form every verifier reads.
  as_text = ['' if a is None else f'The answer is \\boxed{{{a}}}' for a in voted]
  correct, failures = score(verifier, as_text, split.answers)
  return {'accuracy': float((correct >= 1).mean()), 'reward_failures': failures,
          'no_answer': float(np.mean([a is None for a in voted]))}


def restore_params(workdir: str, abstract_params, model_config: dict[str, Any] | None = None,
                   folders: Sequence[str] | None = None) -> tuple[Any, str, int]:
  """The policy params of the latest checkpoint of the first of `folders` that has one (default: policy_stages, the
  last RL stage's, else SFT's).

  abstract_params: the nnx.State of nnx.Param as shape/dtype/sharding structs (e.g. from nnx.eval_shape);
  only the params are read (no optimizer state). A LoRA checkpoint's adapters are read too and merged into the
  returned plain params (W + scale * A @ B). Returns (params, stage folder, step).
  """
  folders = policy_stages(workdir) if folders is None else tuple(folders)
  for stage in folders:
    mngr = checkpoint.manager(workdir, stage, max_to_keep=1_000_000)  # never prunes: only reads here
    meta = checkpoint.read_meta(mngr)
    if meta is None:
      continue
    checkpoint.check_policy_layout(mngr, meta['step'])
    if model_config is not None:
      checkpoint.check_model_config(meta, model_config, f'{workdir}/checkpoints/{stage}')
    lora_cfg = lora.LoraConfig.from_json(meta['lora']) if meta.get('lora') else None
    target_params = abstract_params
    if lora_cfg is not None:
      target_params = nnx.merge_state(abstract_params, _abstract_adapters(abstract_params, meta['model'], lora_cfg))
    params = checkpoint.restore_subtree(mngr, meta['step'], Role.POLICY, {'params': target_params})['params']
    if lora_cfg is not None:
      params = lora.merge_into_base(params, lora_cfg.scale)
    return params, stage, meta['step']
  raise checkpoint.CheckpointError(f'{workdir} has no checkpoint of any stage {folders} under '
                                   f'{workdir}/checkpoints')


def _abstract_adapters(abstract_params, model_config: dict[str, Any], lora_cfg: lora.LoraConfig):
  """The adapters' restore target, placed like abstract_params (on its mesh by the default rules)."""
  adapters = lora.abstract_adapters(ModelConfig(**model_config), lora_cfg)
  where = jax.tree.leaves(abstract_params)[0].sharding
  if isinstance(where, NamedSharding):
    shardings = sharding.tree_shardings(adapters, where.mesh, sharding.Rules(allow_replication_fallback=True))
  else:  # one device (or unplaced): everything alike
    shardings = jax.tree.map(lambda _: where, adapters)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), adapters, shardings)


def policy_stages(workdir: str, iteration: int | None = None) -> tuple[str, ...]:
  """The checkpoint folders to read a workdir's policy from, in order of preference (stages.policy_folders).

  Default: the last outer iteration's RL stage ('grpo_<I>', or 'grpo' / 'ppo' for a single iteration), else SFT.
  With `iteration` k: that iteration's end ('grpo_<k>'; a plain 'grpo' or 'ppo' is iteration 1); 0 is SFT.
  """
  present = checkpoint.stage_folders(workdir)
  if iteration is None:
    return stages.policy_folders(present)
  if iteration == 0:
    return (stages.SFT.name,)
  numbered = {stages.parse_folder(f)[1]: f for f in stages.rl_folders(present) if stages.parse_folder(f)[1]}
  plain = [f for f in stages.rl_folders(present) if stages.parse_folder(f)[1] is None]
  if iteration in numbered:
    return (numbered[iteration],)
  if iteration == 1 and plain:
    return (plain[0],)
  have = sorted(numbered) or ([1] if plain else [])
  raise checkpoint.CheckpointError(f'{workdir} has no checkpoint of outer iteration {iteration}; it has '
                                   f'iterations {have} (0 = SFT)')


def load_policy(*, model_dir: str | None = None, workdir: str | None = None, dtype: str = 'float32', mesh=None,
                iteration: int | None = None):
  """(graphdef, params, model_config, tokenizer) from a Hugging Face directory or a training workdir.

  A workdir gives the params of its latest checkpoint (the last iteration's RL stage, else SFT; or outer iteration
  `iteration`'s, see policy_stages), the model config saved with it and the tokenizer the run saved in
  <workdir>/tokenizer.
  """
  if (model_dir is None) == (workdir is None):
    raise ValueError('give exactly one of a model directory and a training workdir')
  if workdir is not None:
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise FileNotFoundError(f'{workdir!r} is not a training workdir (it has no checkpoints/)')
    saved = checkpoint.saved_model_config(workdir)
    model_cfg = ModelConfig(**{**saved, 'dtype': dtype})
    tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
  else:
    model_cfg = dataclasses.replace(hf.read_config(model_dir), dtype=dtype, param_dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  mesh = mesh if mesh is not None else sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  shardings = sharding.tree_shardings(abstract_params, mesh)
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract_params, shardings)
  if workdir is not None:
    params, stage, step = restore_params(workdir, abstract_params, saved, policy_stages(workdir, iteration))
    distributed.print0(f'loaded {workdir}: {stage} checkpoint, step {step}')
  else:
    params = hf.load_params(model_dir, model_cfg, dtype=model_cfg.param_dtype, shardings=shardings)
  return graphdef, params, model_cfg, tokenizer
