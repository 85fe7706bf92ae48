r"""SFT warm-start, then GRPO, then a held-out comparison. The one entry point.

  python -m grpo_jax.train --config configs/default.py --workdir /tmp/grpo
  python -m grpo_jax.train --config configs/default.py:tiny --workdir /tmp/tiny --config.rl.group_size=16

Rerunning with the same --workdir resumes from the last checkpoint of the unfinished stage.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from grpo_jax.core.advantages import get_advantage_fn
from grpo_jax.core.logprobs import make_sequence_logprobs_fn
from grpo_jax.data.batches import TokenizedSplit, batch_indices, encode
from grpo_jax.data.datasets import load_examples, load_jsonl
from grpo_jax.data.tasks import generate_split, vocabulary
from grpo_jax.data.tokenizer import build_tokenizer, load_tokenizer, stop_token_ids
from grpo_jax.models import hf, lora
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import distributed, flops, sharding
from grpo_jax.pipeline import checkpoint
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.evaluate import greedy_eval
from grpo_jax.pipeline.grpo import collect_rollout, grpo_objective, update
from grpo_jax.pipeline.metrics import MetricWriter
from grpo_jax.pipeline.sft import SFTBatch, sft_loss, sft_token_count
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rewards.registry import get_reward_fn
from grpo_jax.rollout.sampling import make_sampler

STAGES = ['sft', 'grpo']
SECTIONS = {'sft': 'sft', 'grpo': 'rl'}  # each stage's config section
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the summary go.')


def tokenizer_and_model_config(cfg):
  """The embedded task's tokenizer and a model from config.model, or a local Hugging Face model's (model.path).

  A config that also writes the architecture out (configs/deepseekmath_7b.py) must agree with the model's
  config.json.
  """
  dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
  forward_knobs = ('remat', 'logprob_chunk')  # how the training forward runs (Job.loss_fn), not the architecture
  arch = {k: v for k, v in cfg.model.to_dict().items() if k not in ('path', *dtypes, *forward_knobs)}
  if cfg.model.get('path'):
    tokenizer = load_tokenizer(cfg.model.path)
    model_cfg = dataclasses.replace(hf.read_config(cfg.model.path), **dtypes)
    differ = {k: (v, getattr(model_cfg, k)) for k, v in arch.items() if getattr(model_cfg, k) != v}
    if differ:
      raise ValueError(f'config.model and {cfg.model.path}/config.json disagree (config, checkpoint): {differ}')
  else:
    tokenizer = build_tokenizer(vocabulary())
    model_cfg = ModelConfig(**{'vocab_size': len(tokenizer), **arch, **dtypes})
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model embeds only {model_cfg.vocab_size}')
  return tokenizer, model_cfg


def task_splits(task, seed: int) -> dict[str, list]:
  """Examples (.question, .solution, .answer) of the 'train', 'val' and 'test' splits.

  For datasets, 'val' (SFT early stopping) is the last task.num_val examples of the train file, and 'test'
  the first task.num_test of the test file (0 = all of it).
  """
  if task.name == 'arithmetic':
    gen = dict(seed=seed, min_steps=task.min_steps, max_steps=task.max_steps,
               start_range=tuple(task.start_range), change_range=tuple(task.change_range))
    return {split: generate_split(split, task[f'num_{split}'], **gen) for split in ('train', 'val', 'test')}
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


class Interrupt:
  """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and exits."""

  def __init__(self):
    self.signal = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second signal: stop now, without the checkpoint
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __bool__(self):
    return self.signal is not None


class Policy(NamedTuple):
  """The model a stage trains: the plain Transformer (lora None) or the same with LoRA adapters."""
  graphdef: nnx.GraphDef
  lora: lora.LoraConfig | None
  param_shardings: Any  # its params' training layout
  greedy_sampler: Callable  # evaluation
  sampler: Callable  # rollouts: rl.temperature / top_k / top_p, G per prompt


class Job:
  """What both stages share: config, mesh, model structure, data, samplers, sinks."""

  progress_keys = ('nll', 'val_accuracy', 'reward', 'kl', 'clip_frac')  # shown on the progress bar

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.tokenizer, self.model_cfg = tokenizer_and_model_config(cfg)
    self.model_cfg_dict = dataclasses.asdict(self.model_cfg)
    encode_kw = dict(max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens,
                     template=cfg.task.prompt_template, chat=cfg.task.chat,
                     skip_long_prompts=cfg.task.get('skip_long_prompts', False))
    self.splits: dict[str, TokenizedSplit] = {
        split: encode(self.tokenizer, examples, split=split, with_solutions=cfg.sft.max_steps > 0, **encode_kw)
        for split, examples in task_splits(cfg.task, cfg.seed).items()}
    for split in ('train', 'test'):
      if not len(self.splits[split]):
        raise ValueError(f'the {split} split is empty (after dropping prompts longer than max_prompt_len='
                         f'{cfg.max_prompt_len}?)')
    for stage in STAGES:  # a mismatched checkpoint fails here, before any compile
      meta = checkpoint.read_meta(self.manager(stage))
      if meta is not None:
        checkpoint.check_model_config(meta, self.model_cfg_dict, f'{workdir}/checkpoints/{stage}')
        self._check_lora(meta, stage)

    self.mesh = sharding.make_mesh({a: cfg.mesh[a] for a in sharding.MESH_AXES})
    self.rules, self.sampler_rules = sharding.rules_from_config(cfg.get('sharding'))  # training, sampling layouts
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    if cfg.model.get('path'):  # weights straight from safetensors into their shardings; no random init
      abstract = nnx.eval_shape(lambda: Transformer(self.model_cfg, nnx.Rngs(cfg.seed)))
      self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
      self.param_shardings = sharding.tree_shardings(abstract_params, self.mesh, self.rules)
      self.init_params = hf.load_params(cfg.model.path, self.model_cfg, dtype=jnp.dtype(self.model_cfg.param_dtype),
                                        shardings=self.param_shardings)
    else:
      self.graphdef, params = nnx.split(Transformer(self.model_cfg, nnx.Rngs(cfg.seed)), nnx.Param)
      self.param_shardings = sharding.tree_shardings(params, self.mesh, self.rules)
      self.init_params = jax.device_put(params, self.param_shardings)
    self.reward_fn = get_reward_fn(cfg.rl.reward)
    self.verifier = get_reward_fn(cfg.task.verifier)
    self.plain = self._make_policy(self.graphdef, self.init_params, None)
    self._lora_policies: dict[lora.LoraConfig, Policy] = {}
    self.writer = MetricWriter(workdir, active=distributed.is_main_process())
    self.interrupt = Interrupt()
    self.rng = jax.random.key(cfg.seed)

  def _make_policy(self, graphdef, params, lora_cfg: lora.LoraConfig | None) -> Policy:
    """params: concrete or abstract (only their structure and shapes are read)."""
    cfg = self.cfg
    tok = dict(max_new_tokens=cfg.max_new_tokens, decode_block=cfg.get('decode_block', 0),
               eos_id=stop_token_ids(self.tokenizer, cfg.model.get('path')),
               pad_id=self.tokenizer.pad_token_id, mesh=self.mesh, rules=self.sampler_rules,
               # the samplers reshard params to their own layout first when config.sharding.sampler_rules differ
               param_shardings=sharding.tree_shardings(params, self.mesh, self.sampler_rules))
    # On several hosts: prompts in as global arrays from each host's rows, completions out as numpy everywhere.
    host_io = functools.partial(distributed.host_io, batch_sharding=self.batch_sharding, batch_argnums=(1, 2))
    # A LoRA policy samples with its adapters unmerged (lora.py): no merged copy of the weights per rollout.
    greedy_sampler = host_io(make_sampler(graphdef, greedy=True, **tok))
    sampler = host_io(make_sampler(graphdef, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k,
                                   top_p=cfg.rl.top_p, group_size=cfg.rl.group_size, **tok))
    return Policy(graphdef, lora_cfg, sharding.tree_shardings(params, self.mesh, self.rules), greedy_sampler,
                  sampler)

  def policy(self, stage: str) -> Policy:
    """The stage's model: plain, or with LoRA adapters when config.lora lists the stage."""
    lora_cfg = lora.stage_config(self.cfg.get('lora'), SECTIONS[stage])
    if lora_cfg is None:
      return self.plain
    if lora_cfg not in self._lora_policies:
      abstract = nnx.eval_shape(lambda: Transformer(self.model_cfg, nnx.Rngs(0), lora=lora_cfg))
      self._lora_policies[lora_cfg] = self._make_policy(*nnx.split(abstract, nnx.Param), lora_cfg)
    return self._lora_policies[lora_cfg]

  def _check_lora(self, meta: dict, stage: str) -> None:
    lora_cfg = lora.stage_config(self.cfg.get('lora'), SECTIONS[stage])
    want = None if lora_cfg is None else lora_cfg.to_json()
    if meta.get('lora') != want:
      raise checkpoint.CheckpointError(
          f'{self.workdir}/checkpoints/{stage} holds a checkpoint trained with LoRA {meta.get("lora")} but '
          f'config.lora gives {want} (None: full fine-tuning); use a fresh --workdir or the saved config')

  def manager(self, stage: str):
    return checkpoint.manager(self.workdir, stage, max_to_keep=self.cfg.checkpoint_keep)

  def evaluate(self, params, split: str, policy: Policy | None = None) -> dict[str, float]:
    return greedy_eval((policy or self.plain).greedy_sampler, params, self.splits[split], self.tokenizer,
                       self.reward_fn, batch_size=self.cfg.eval.batch_size, rng=self.rng, verifier=self.verifier)

  def with_adapters(self, stage: str, params, policy: Policy):
    """params plus fresh adapters for a LoRA stage (A random, B zero: the model's function is unchanged)."""
    key = jax.random.fold_in(self.rng, 1000 + STAGES.index(stage))
    adapters = lora.init_adapters(self.model_cfg, policy.lora, key,
                                  shardings=lora.split_params(policy.param_shardings)[0])
    n_adapter, n_base = (sum(x.size for x in jax.tree.leaves(t)) for t in (adapters, params))
    distributed.print0(f'{stage}: LoRA rank {policy.lora.rank} on {",".join(policy.lora.targets)}: '
                       f'{n_adapter:,} trained params ({100 * n_adapter / n_base:.2f}% of the frozen {n_base:,})')
    return nnx.merge_state(params, adapters)

  def merged(self, params, policy: Policy):
    """A LoRA policy's params as plain Transformer params, W + scale * A @ B; the base's buffers are reused."""
    if policy.lora is None:
      return params
    return lora.merge_into_base(params, policy.lora.scale, out_shardings=self.param_shardings)

  def meta(self, stage: str, step: int, **extra) -> dict:
    return {'stage': stage, 'step': step, 'model': self.model_cfg_dict,
            'rng': np.asarray(jax.random.key_data(self.rng)).tolist(), **extra}

  def run_stage(self, stage: str, num_steps: int, params, step_fn, *, extra_trees=None, carry=None):
    """The loop both stages share: resume, step, log, checkpoint, stop on signal or when step_fn says so.

    step_fn(state, step, carry) -> (state, metrics, carry, stop); `carry` is JSON (kept in checkpoint meta).
    step_fn is built by step_fn(train_step, extra_trees, policy) once the (possibly restored) trees are known.
    A LoRA stage (policy.lora) trains adapters on the frozen `params` and returns them merged (lora.py).
    Returns (final params, summary dict of the stage incl. held-out eval).
    """
    cfg, mngr = self.cfg, self.manager(stage)
    opt_cfg = cfg[SECTIONS[stage]]
    policy = self.policy(stage)
    tx = make_optimizer(opt_cfg, num_steps, param_dtype=self.model_cfg.param_dtype)
    # LoRA: the state holds the frozen base once plus the adapters; optimizer state only for the adapters.
    trainable = None if policy.lora is None else lora.TRAINABLE
    if policy.lora is not None:
      params = self.with_adapters(stage, params, policy)
    state = init_state(params, tx, self.mesh, self.rules, trainable=trainable)
    extra_trees = extra_trees or {}
    meta = checkpoint.read_meta(mngr)
    step, wall, stop = 0, 0.0, False
    if meta is not None:
      restored = checkpoint.restore(mngr, meta['step'], {'state': state, **extra_trees})
      state, extra_trees = restored['state'], {k: restored[k] for k in extra_trees}
      step, wall, carry, stop = meta['step'], meta['wall_time'], meta['carry'], meta['stopped']
      if meta.get('finished'):
        return self.merged(state.params, policy), meta['summary']
      distributed.print0(f'{stage}: resuming from step {step}')
    self.writer.rewind(STAGES, stage, step)
    train_step = make_train_step(policy.graphdef, tx, self.loss_fn(stage),
                                 state_shardings(state, self.mesh, self.rules), self.batch_sharding, self.mesh,
                                 self.rules, grad_accum_steps=opt_cfg.get('grad_accum_steps', 1),
                                 micro_weight=sft_token_count if stage == 'sft' else None,  # sft_loss: a token mean
                                 trainable=trainable)
    train_step = distributed.host_io(train_step, self.batch_sharding, batch_argnums=(1,), gather=False)
    step_fn = step_fn(train_step, extra_trees, policy)
    lora_meta = {} if policy.lora is None else {'lora': policy.lora.to_json()}

    def save(finished=False, summary=None):
      checkpoint.save(mngr, step, {'state': state, **extra_trees},
                      self.meta(stage, step, wall_time=wall + time.perf_counter() - start, carry=carry,
                                finished=finished, stopped=stop, summary=summary, data_position=step, **lora_meta))

    distributed.print0(f'\n=== {stage}: steps {step} -> {num_steps} ===')
    start = time.perf_counter()
    bar = tqdm(total=num_steps, initial=step, desc=stage, dynamic_ncols=True,
               disable=not distributed.is_main_process())
    while step < num_steps and not stop:
      t0 = time.perf_counter()
      state, metrics, carry, stop = step_fn(state, step, carry)
      step += 1
      if step % cfg.log_every == 0 or stop or step == num_steps:
        metrics = {k: float(v) if np.ndim(v) == 0 else v for k, v in jax.device_get(metrics).items()}
        metrics['step_time'] = time.perf_counter() - t0
        if 'model_flops' in metrics:  # GRPO steps report their work; the rates need the step time taken here
          metrics.update(flops.throughput(metrics, metrics['step_time'], num_devices=self.mesh.size,
                                          device_kind=jax.devices()[0].device_kind, dtype=self.model_cfg.dtype))
        self.writer.write(stage, step, metrics)
        bar.set_postfix({k: f'{v:.3g}' for k, v in metrics.items() if k in self.progress_keys})
      bar.update(1)
      if distributed.any_process(bool(self.interrupt)):  # the save is collective: all hosts stop together
        save()
        bar.close()
        raise SystemExit(f'{self.interrupt.signal or "signal on another host"}: saved {stage} checkpoint at step '
                         f'{step}; rerun the same command to resume.')
      if step % cfg.checkpoint_every == 0:
        save()
    bar.close()
    held_out = self.evaluate(state.params, 'test', policy)
    summary = {'test_accuracy': held_out['accuracy'], 'test_reward': held_out['reward'], 'steps': step,
               'wall_time': wall + time.perf_counter() - start, 'sample': held_out['sample'], 'carry': carry}
    save(finished=True, summary=summary)
    return self.merged(state.params, policy), summary

  def loss_fn(self, stage: str):
    memory = dict(logprob_chunk=self.cfg.model.get('logprob_chunk', 0), remat=self.cfg.model.get('remat', 'none'))
    if stage == 'sft':
      return functools.partial(sft_loss, **memory)
    rl = self.cfg.rl
    return functools.partial(grpo_objective, clip_eps=rl.clip_eps, beta=rl.beta, kl_estimator=rl.kl_estimator,
                             **memory)

  def sft_step_fn(self, train_step, extra_trees, policy: Policy):
    cfg, train = self.cfg, self.splits['train']

    def step_fn(state, step, carry):
      idx = batch_indices(len(train), cfg.sft.batch_size, step, seed=cfg.seed, stream='sft')
      b = train.take(idx)
      state, metrics = train_step(state, SFTBatch(b.prompt_tokens, b.prompt_mask, b.completion_tokens,
                                                  b.completion_mask))
      stop = False
      if (step + 1) % cfg.sft.eval_every == 0:
        val = self.evaluate(state.params, 'val', policy)
        metrics = dict(metrics, val_accuracy=val['accuracy'])
        stop = val['accuracy'] >= cfg.sft.target_accuracy
        carry = {'val_accuracy': val['accuracy'], 'stop_reason': 'target' if stop else 'cap'}
      return state, metrics, carry, stop

    return step_fn

  def grpo_step_fn(self, train_step, extra_trees, policy: Policy):
    cfg, rl, train = self.cfg, self.cfg.rl, self.splits['train']
    ref_fn = None
    if rl.beta > 0:  # the plain model: with LoRA, on the policy's own frozen base (adapters off), not a copy
      ref_fn = make_sequence_logprobs_fn(self.graphdef, param_shardings=self.param_shardings, mesh=self.mesh,
                                         rules=self.rules, chunk_size=cfg.model.get('logprob_chunk', 0),
                                         num_micro_batches=rl.num_minibatches * rl.get('grad_accum_steps', 1))
      ref_fn = distributed.host_io(ref_fn, self.batch_sharding, batch_argnums=(1, 2, 3, 4))
    advantage_fn = get_advantage_fn(rl.advantage)
    rng = jax.random.fold_in(self.rng, 1)

    def step_fn(state, step, carry):
      ref_params = extra_trees['reference'] if policy.lora is None else lora.base_params(state.params)
      sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, step))
      prompts = train.take(batch_indices(len(train), rl.num_prompts, step, seed=cfg.seed, stream='grpo'))
      rollout, stats = collect_rollout(policy.sampler, ref_fn, state.params, ref_params, prompts, sample_rng,
                                       group_size=rl.group_size, tokenizer=self.tokenizer,
                                       reward_fn=self.reward_fn, advantage_fn=advantage_fn,
                                       verifier=self.verifier)
      state, metrics = update(train_step, state, rollout, shuffle_rng, num_epochs=rl.num_epochs,
                              num_minibatches=rl.num_minibatches)
      work = flops.grpo_step_work(self.model_cfg, rollout.prompt_mask, rollout.completion_mask,
                                  group_size=rl.group_size, reference=ref_fn is not None, num_epochs=rl.num_epochs)
      return state, {**stats, **metrics, **work}, carry, False

    return step_fn



def _table(rows: list[tuple[str, float, float, float]]) -> str:
  lines = [f"{'stage':<8} {'held-out acc':>12} {'mean reward':>12} {'wall (s)':>9}"]
  lines += [f'{s:<8} {a:>12.3f} {r:>12.3f} {w:>9.1f}' for s, a, r, w in rows]
  return '\n'.join(lines)


def run(cfg, workdir: str) -> dict:
  distributed.use_cpu_devices(cfg.get('cpu_devices', 0))  # before the first jax call below starts the backend
  check_config(cfg, jax.device_count())
  distributed.use_compile_cache(cfg.get('compile_cache_dir', ''))
  os.makedirs(workdir, exist_ok=True)
  job = Job(cfg, workdir)  # validates data and any existing checkpoint before writing anything
  is_main = distributed.is_main_process()  # on several hosts (one shared workdir) process 0 writes the files
  generation_config = os.path.join(cfg.model.get('path') or '', 'generation_config.json')
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    job.tokenizer.save_pretrained(os.path.join(workdir, 'tokenizer'))
    if cfg.model.get('path') and os.path.isfile(generation_config):  # its stop tokens, for eval from the workdir
      shutil.copy(generation_config, os.path.join(workdir, 'tokenizer'))
  n_params = sum(x.size for x in jax.tree.leaves(job.init_params))
  distributed.print0(f'model: {n_params / 1e6:.2f}M params; devices: {jax.device_count()} '
                     f'({jax.process_count()} processes); mesh: {dict(job.mesh.shape)}')

  init_path = os.path.join(workdir, 'init_eval.json')  # kept, so a resumed run does not re-evaluate
  if os.path.exists(init_path):
    with open(init_path) as f:
      init_eval = json.load(f)
  else:
    init_eval = job.evaluate(job.init_params, 'test')  # collective; every process gets the same numbers
    if is_main:
      with open(init_path, 'w') as f:
        json.dump(init_eval, f)
  if cfg.sft.max_steps > 0:
    sft_params, sft = job.run_stage('sft', cfg.sft.max_steps, job.init_params, job.sft_step_fn)
  else:  # RL straight from the loaded model (an SFT / instruct checkpoint), as in the paper
    sft_params, sft = job.init_params, {'test_accuracy': init_eval['accuracy'], 'test_reward': init_eval['reward'],
                                        'steps': 0, 'wall_time': 0.0, 'sample': init_eval['sample']}
  if lora.stage_config(cfg.get('lora'), 'rl') is None:
    extra_trees = {'reference': jax.tree.map(jnp.copy, sft_params)}  # frozen reference = the SFT policy
  else:  # the reference is the frozen base (= the SFT policy) inside the train state: no copy
    extra_trees = {}
  grpo_params, grpo = job.run_stage('grpo', cfg.rl.num_steps, sft_params, job.grpo_step_fn, extra_trees=extra_trees)
  job.writer.close()
  if cfg.get('export_hf', False):  # the trained policy as a Hugging Face model directory
    export_dir = os.path.join(workdir, 'hf_model')
    hf.save_model(nnx.merge(job.graphdef, grpo_params), job.model_cfg, export_dir)  # collective; process 0 writes
    if is_main:
      job.tokenizer.save_pretrained(export_dir)
      if os.path.isfile(generation_config):
        shutil.copy(generation_config, export_dir)
    distributed.print0(f'exported the policy to {export_dir}')

  summary = {'init_accuracy': init_eval['accuracy'], 'sft_accuracy': sft['test_accuracy'],
             'grpo_accuracy': grpo['test_accuracy'], 'sft_reward': sft['test_reward'],
             'grpo_reward': grpo['test_reward'], 'sft_steps': sft['steps'], 'grpo_steps': grpo['steps'],
             'sft_wall_time': sft['wall_time'], 'grpo_wall_time': grpo['wall_time'],
             'sft_sample': sft['sample'], 'grpo_sample': grpo['sample']}
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  distributed.print0('\n' + _table([('init', init_eval['accuracy'], init_eval['reward'], 0.0),
                                    ('sft', sft['test_accuracy'], sft['test_reward'], sft['wall_time']),
                                    ('grpo', grpo['test_accuracy'], grpo['test_reward'], grpo['wall_time'])]))
  distributed.print0(f'summary: {os.path.join(workdir, "summary.json")}')
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  distributed.initialize()  # before any other jax call: it fixes the global device list on several hosts
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
