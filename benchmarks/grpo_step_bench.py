"""grpo_jax on the workload of ../shared/bench/trl_grpo_baseline.py (read its docstring), same JSON keys.

  python benchmarks/grpo_step_bench.py --steps 10 --max-completion-length 32 --fixed-length
  python benchmarks/grpo_step_bench.py --workload gsm8k --steps 5     # benchmarks/gsm8k_workload.py's spec

Model: Qwen2-shaped (vocab 49, hidden 256, mlp 688, 4 layers, 4 heads of 64, 2 kv heads, q/k/v bias, tied
embeddings), random init, fp32. Per step: 4 prompts "<bos>Q: {a}+{b}= A:" x G=8, sampled at temperature 1,
reward = first integer equals a+b, group advantages, reference forward (beta 0.04, k3), one AdamW update
(lr 1e-5, clip 1.0). The step is the trainer's own code path, built as the trainer builds it
(`pipeline/setup.build_setup`, `pipeline/grpo.make_packed_train_step`): `collect_rollout` + `grpo.update`.
Step 1 (compilation) is excluded, as TRL's warm-up step is.

--workload gsm8k (the twin of benchmarks/trl_gsm8k.py): ~150-token prompts left-padded to 160, G = 16, P = 4,
completions of 256 at most whose lengths are forced to the workload's seeded draw (benchmarks/gsm8k_step.py says
how, on the trainer's own sampler). Its roofline counts only the FLOPs the step must do (gsm8k_step.must_do_flops:
each prompt once per group, completions up to their EOS); 'padded_step_gflops' is models/flops.grpo_step_flops
on the padded shapes the step runs (each prompt once per group too under rl.shared_prompt).

--workload gsm8k --model smollm2 (the twin of trl_gsm8k.py --model smollm2; the workload spec's real-model variant):
SmolLM2-135M-Instruct from its GGUF file with configs/smollm2.py's settings (its remat, micro-batches, KV-cache
block, logprob chunk, reward, lr and CPU devices, unless a flag says otherwise) set to the workload: chat-template
GSM8K prompts left-padded to gsm8k_workload.PROMPT_WIDTH, G = 8, the forced lengths (cut to --max-completion-length
when it is below 256, for smoke runs). Its phases are timed once each after the steps (each is seconds; the steps
compiled their shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import string
import sys
import time
from ast import literal_eval

import jax
import numpy as np
from ml_collections import ConfigDict

from configs import default, smollm2
from grpo_jax.core import packing
from grpo_jax.core.advantages import get_advantage_fn
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.flops import grpo_step_flops
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.loop import COMPILES
from grpo_jax.pipeline.setup import build_setup, pack_row_buckets, shared_prompt_group
from grpo_jax.pipeline.train_state import init_state, make_optimizer
from grpo_jax.rollout.rollout import Rollout, collect_rollout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsm8k_workload  # noqa: E402
from gsm8k_step import forced_length_sampler, left_padded, must_do_flops, prompt_split  # noqa: E402
from roofline import matmul_peak_flops  # noqa: E402

CHARACTERS = string.digits + ' +-*/=:' + 'QA' + string.ascii_lowercase  # 45 + 4 specials = 49
MODEL = dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=688, rope_theta=10000.0,
             rms_eps=1e-6, qkv_bias=True, tie_embeddings=True)


def cpu_sample():
  """(wall, system-wide busy CPU seconds, this process's CPU seconds), for the shared-machine guard."""
  busy = None
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    pass
  t = os.times()
  return time.perf_counter(), busy, t.user + t.system


def prompts(tokenizer, n: int, seed: int = 0) -> TokenizedSplit:
  rng = random.Random(seed)
  pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
  ids = [[tokenizer.bos_token_id] + tokenizer(f'Q: {a}+{b}= A:', add_special_tokens=False)['input_ids']
         for a, b in pairs]
  tokens = np.asarray(ids, np.int32)  # every prompt is 13 tokens: no padding needed
  empty = np.zeros((n, 1), np.int32)
  return TokenizedSplit(tokens, np.ones_like(tokens), empty, empty, [str(a + b) for a, b in pairs])


def workload_config(args, prompt_len: int = 13) -> ConfigDict:
  """The trainer's config (configs/default.py) set to this workload: the model above, P prompts x G, the TRL
  script's optimizer and KL weight, the first-integer reward; then the --set overrides."""
  cfg = default.get_config()
  cfg.model.update(MODEL)
  cfg.max_prompt_len, cfg.max_new_tokens = prompt_len, args.max_completion_length  # addition: 13 tokens each
  cfg.decode_block, cfg.decode_buckets = args.decode_block, args.decode_buckets
  cfg.rl.num_prompts, cfg.rl.group_size = args.prompts_per_step, args.num_generations
  cfg.rl.num_epochs, cfg.rl.num_minibatches, cfg.rl.grad_accum_steps = 1, 1, args.micro_batches
  cfg.rl.beta, cfg.rl.lr, cfg.rl.reward = args.beta, 1e-5, 'first_integer'
  cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p = 1.0, 0, 1.0
  cfg.eval.batch_size = args.prompts_per_step  # unused; must split over the devices
  cfg.sft.max_steps = 0
  return apply_overrides(cfg, args.set)


def smollm2_workload_config(args) -> ConfigDict:
  """configs/smollm2.py (model, memory settings, reward, lr) set to the workload's batch, lengths and sampling;
  then the --set overrides."""
  cfg = smollm2.get_config()
  if args.gguf:
    cfg.model.path = args.gguf
  cfg.max_prompt_len, cfg.max_new_tokens = gsm8k_workload.PROMPT_WIDTH, args.max_completion_length
  cfg.decode_block, cfg.decode_buckets = args.decode_block, args.decode_buckets
  cfg.rl.num_prompts, cfg.rl.group_size = args.prompts_per_step, args.num_generations
  cfg.rl.num_epochs, cfg.rl.num_minibatches, cfg.rl.grad_accum_steps = 1, 1, args.micro_batches
  cfg.rl.beta, cfg.rl.lr = args.beta, gsm8k_workload.SMOLLM2_LR  # the config's, written here as the spec says
  cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p = 1.0, 0, 1.0
  cfg.eval.batch_size = args.prompts_per_step  # unused; must split over the devices
  return apply_overrides(cfg, args.set)


def apply_overrides(cfg: ConfigDict, items: list[str]) -> ConfigDict:
  for item in items:  # e.g. rl.grad_accum_steps=4: dotted config path = Python literal (else a string)
    path, _, text = item.partition('=')
    *parents, leaf = path.split('.')
    node = cfg
    for name in parents:
      node = node[name]
    if leaf not in node:  # the config is not locked: a mistyped name would add a field nothing reads
      raise ValueError(f'--set {item}: config has no field {path}')
    try:
      value = literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[leaf] = value  # an unknown field or a wrong type is ml_collections' error
  return cfg


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workload', choices=('addition', 'gsm8k'), default='addition',
                  help="addition: trl_grpo_baseline.py's; gsm8k: benchmarks/gsm8k_workload.py's (its own defaults "
                       'for the three flags below)')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--max-completion-length', type=int, default=None,
                  help='addition: 32; gsm8k: the budget, 256 (the longest forced length) or more')
  ap.add_argument('--num-generations', type=int, default=None, help='addition: 8; gsm8k: 16 (smollm2: 8)')
  ap.add_argument('--prompts-per-step', type=int, default=None,
                  help=f'addition: 4; gsm8k: {gsm8k_workload.PROMPTS_PER_STEP}')
  ap.add_argument('--model', choices=('character', 'smollm2'), default='character',
                  help="character: the TRL baseline's random character-level model; smollm2 (gsm8k only): "
                       'SmolLM2-135M-Instruct with configs/smollm2.py')
  ap.add_argument('--gguf', default='', help="smollm2: the GGUF file (default: configs/smollm2.py's model.path)")
  ap.add_argument('--seed', type=int, default=0, help="gsm8k: the workload's prompts and lengths")
  ap.add_argument('--beta', type=float, default=0.04)
  ap.add_argument('--fixed-length', action='store_true', help='suppress EOS: every completion is full length')
  ap.add_argument('--micro-batches', type=int, default=None,
                  help='rl.grad_accum_steps: the update (and the reference forward) computed over this many equal '
                       'micro-batches (the same result; on CPU smaller working sets are faster and use less memory); '
                       "default 1, smollm2: configs/smollm2.py's")
  ap.add_argument('--decode-block', type=int, default=None,
                  help="config.decode_block: the KV cache grows this many slots at a time (same tokens); default 0, "
                       "smollm2: configs/smollm2.py's")
  ap.add_argument('--decode-buckets', type=int, default=None,
                  help='config.decode_buckets: k > 1 decodes each block after the first at the smallest of k batch '
                       'sizes b, b/2, ... that holds the rows not yet ended (needs --decode-block; same tokens); '
                       "default 1, smollm2: configs/smollm2.py's")
  ap.add_argument('--cpu-devices', type=int, default=None,
                  help="config.cpu_devices: XLA CPU devices that share each batch (the trainer's default 2; 0 = one; "
                       "smollm2: configs/smollm2.py's)")
  ap.add_argument('--compile-cache', default='',
                  help='config.compile_cache_dir: load compiled executables from this dir (a rerun: run twice)')
  ap.add_argument('--set', action='append', default=[], metavar='PATH=VALUE',
                  help='a config override, e.g. --set rl.grad_accum_steps=4 (repeatable; named in impl)')
  args = ap.parse_args()
  if args.steps < 2:
    ap.error('--steps must be >= 2 (step 1 is warm-up)')
  if any('=' not in item for item in args.set):
    ap.error(f'--set takes PATH=VALUE, got {args.set}')
  gsm8k, real = args.workload == 'gsm8k', args.model == 'smollm2'
  if real and not gsm8k:
    ap.error('--model smollm2 runs --workload gsm8k only')
  defaults = ((gsm8k_workload.MAX_COMPLETION, gsm8k_workload.SMOLLM2_G if real else gsm8k_workload.G,
               gsm8k_workload.PROMPTS_PER_STEP) if gsm8k else (32, 8, 4))
  for name, value in zip(('max_completion_length', 'num_generations', 'prompts_per_step'), defaults, strict=True):
    if getattr(args, name) is None:
      setattr(args, name, value)
  if gsm8k and (args.fixed_length or args.max_completion_length < gsm8k_workload.MAX_COMPLETION and not real):
    ap.error(f'--workload gsm8k forces its own lengths (at most {gsm8k_workload.MAX_COMPLETION}): no '
             f'--fixed-length, no --max-completion-length below {gsm8k_workload.MAX_COMPLETION}')

  t_start = time.perf_counter()
  # Unset flags take the trainer's defaults: configs/smollm2.py's for the real model, the embedded model's else.
  real_cfg = smollm2.get_config()
  flag_defaults = {'cpu_devices': (real_cfg.cpu_devices, 2), 'micro_batches': (real_cfg.rl.grad_accum_steps, 1),
                   'decode_block': (real_cfg.decode_block, 0), 'decode_buckets': (real_cfg.decode_buckets, 1)}
  flag_defaults = {name: pair[0] if real else pair[1] for name, pair in flag_defaults.items()}
  for name, value in flag_defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  distributed.use_cpu_devices(args.cpu_devices)
  distributed.use_compile_cache(args.compile_cache)
  G, P, L = args.num_generations, args.prompts_per_step, args.max_completion_length
  lengths = None
  if gsm8k:  # the forced lengths trl_gsm8k.py draws, from the same code
    lengths = gsm8k_workload.completion_lengths(args.steps, P * G, seed=args.seed)
  if real:  # the model's own tokenizer (from the GGUF file), so the setup comes before the prompts
    cfg = smollm2_workload_config(args)
    check_config(cfg, jax.device_count())
    setup = build_setup(cfg, data=False)
    tokenizer = setup.tokenizer
    rows = gsm8k_workload.chat_prompts(tokenizer, args.steps, P, seed=args.seed)
    data = left_padded([ids for ids, _, _ in rows], [a for _, _, a in rows], width=gsm8k_workload.PROMPT_WIDTH,
                       pad_id=tokenizer.pad_token_id)
    lengths = gsm8k_workload.capped_lengths(lengths, L)
  else:
    tokenizer = build_tokenizer(characters=CHARACTERS)
    if gsm8k:  # the prompts trl_gsm8k.py draws, from the same code
      data = prompt_split(tokenizer, gsm8k_workload.prompts(args.steps, P, seed=args.seed),
                          width=gsm8k_workload.PROMPT_TOKENS_MAX)
    else:
      data = prompts(tokenizer, P * args.steps)
    cfg = workload_config(args, prompt_len=data.prompt_tokens.shape[1])
    check_config(cfg, jax.device_count())
    setup = build_setup(cfg, tokenizer=tokenizer, data=False)  # what the trainer builds, on this tokenizer
  if args.fixed_length or gsm8k:
    setup.eos_ids = (-1,)  # no token ever ends a row (before the first policy() call builds the samplers)
  if gsm8k:  # the forced sampler decodes to the longest forced length; its output is padded to the budget
    cfg.max_new_tokens = max(map(max, lengths))
  policy, params = setup.policy(grpo.NAME), setup.init_params  # as grpo.make_stage asks for it
  cfg.max_new_tokens = L
  cfg_model = setup.model_cfg
  ref_params = jax.tree.map(lambda x: x.copy(), params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx = make_optimizer(cfg.rl, args.steps)
  state = init_state(params, tx, setup.mesh, setup.rules)
  train_step = grpo.make_packed_train_step(setup, policy, state, tx)
  hparams = grpo.loss_hparams(cfg)
  ref_fn, advantage_fn = setup.reference_forward, get_advantage_fn(cfg.rl.advantage)
  buckets = grpo.length_buckets(cfg)  # the widths collect_rollout cuts completions to, as make_stage passes them
  rng = jax.random.key(0)
  eos_id = tokenizer.eos_token_id
  space_id = tokenizer(' ', add_special_tokens=False)['input_ids'][-1]  # what replaces an EOS drawn too early

  marks, gen_times, gen_tokens, rewards = [cpu_sample()], [], [], []
  compiles = [COMPILES.count]  # XLA compilations before the steps, then after each step
  for step in range(args.steps):
    batch = data.take(np.arange(step * P, (step + 1) * P))
    sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, step))
    sampler = policy.sampler
    if gsm8k:
      sampler = forced_length_sampler(sampler, lengths[step], eos_id=eos_id, pad_id=tokenizer.pad_token_id,
                                      replace_id=space_id, budget=L)
    rollout, stats = collect_rollout(sampler, ref_fn, state.params, ref_params, batch, sample_rng,
                                     group_size=G, tokenizer=tokenizer, reward_fn=setup.reward_fn,
                                     advantage_fn=advantage_fn, verifier=setup.verifier, length_buckets=buckets)
    state, metrics = grpo.update(train_step, state, rollout, shuffle_rng, hparams, num_epochs=1, num_minibatches=1,
                                 group_size=shared_prompt_group(cfg))
    jax.block_until_ready(metrics)
    marks.append(cpu_sample())
    compiles.append(COMPILES.count)
    gen_times.append(stats['sample_time'])
    gen_tokens.append(int(rollout.completion_mask.sum()))
    rewards.append(stats['reward'])
    if gsm8k and gen_tokens[-1] != sum(lengths[step]):
      raise AssertionError(f'step {step}: {gen_tokens[-1]} completion tokens, the forced lengths sum to '
                           f'{sum(lengths[step])}')

  # Read before this script's own extra work (matmul peak, phase timings), which TRL's script does not do.
  peak_rss_steps_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  peak = matmul_peak_flops()
  step_times = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:], strict=True)]
  foreign = [None if a[1] is None else max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / max(b[0] - a[0], 1e-9)
             for a, b in zip(marks[:-1], marks[1:], strict=True)]
  clean = [t for t, f in zip(step_times[1:], foreign[1:], strict=True) if f is not None and f < 0.15]
  timed, timed_tok, timed_gen = step_times[1:], gen_tokens[1:], gen_times[1:]

  # Phases timed one by one on the last rollout's shapes (fixed length makes them the step's shapes).
  def one_call(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  def best_time(fn, repeats=3):
    if real:  # a call is seconds and the steps compiled these shapes: one call, again only if that one compiled
      before = COMPILES.count
      first = one_call(fn)
      return first if COMPILES.count == before else one_call(fn)
    jax.block_until_ready(fn())
    return min(one_call(fn) for _ in range(repeats))

  arrays = (rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens, rollout.completion_mask)
  phase_time = {'sample': statistics.median(timed_gen)}
  if ref_fn is not None:
    phase_time['reference_forward'] = best_time(lambda: ref_fn(ref_params, *arrays))
  holder = [state]
  # As host arrays, the form grpo.update hands the step: the rollout's device arrays keep the layouts of the
  # functions that made them (the reference forward's), which the jitted step's batch sharding need not match.
  host_rollout = Rollout(*(np.asarray(x) for x in rollout))

  def one_update():
    holder[0], m = train_step(holder[0], host_rollout, hparams)
    return m

  phase_time['policy_forward_backward'] = best_time(one_update)
  flops = grpo_step_flops(cfg_model, num_prompts=P, group_size=G, prompt_len=data.prompt_tokens.shape[1],
                          completion_len=rollout.completion_mask.shape[1], reference=ref_fn is not None,
                          shared_prompt=shared_prompt_group(cfg) > 1,
                          packed_rows=packing.packed_rows(np.asarray(rollout.completion_mask), G,
                                                          pack_row_buckets(cfg)))
  extra = {}
  if gsm8k:  # the roofline counts what the step must do; the padded count is what it runs
    prompt_lens = data.prompt_mask.sum(axis=1).tolist()
    must = [must_do_flops(cfg_model, prompt_lens=prompt_lens[k * P:(k + 1) * P], completion_lens=lengths[k],
                          group_size=G, reference=ref_fn is not None) for k in range(1, args.steps)]
    extra = {**gsm8k_workload.summary(prompt_lens, lengths,
                                      gsm8k_workload.SMOLLM2_WORKLOAD if real else 'gsm8k'), 'seed': args.seed,
             'padded_prompt_width': [data.prompt_tokens.shape[1]] * args.steps,
             'padded_step_gflops': round(flops['total'] / 1e9, 2)}
    flops = {k: statistics.mean(m[k] for m in must) for k in must[0]}  # the timed steps' mean
  if real:
    extra.update(prompt_ids_sha256=gsm8k_workload.prompt_ids_digest([ids for ids, _, _ in rows]),
                 learning_rate=cfg.rl.lr, remat=cfg.model.remat, logprob_chunk=cfg.model.logprob_chunk,
                 eos_token_ids=[eos_id])
  flops['sample'] = flops['prefill'] + flops['decode']
  roofline_s = flops['total'] / peak
  result = {
      'impl': 'grpo_jax' + (f'/{jax.device_count()}dev' if args.cpu_devices != flag_defaults['cpu_devices'] else '')
              + (f'/{args.micro_batches}mb' if args.micro_batches != flag_defaults['micro_batches'] else '')
              + (f'/block{args.decode_block}' if args.decode_block != flag_defaults['decode_block'] else '')
              + (f'/buckets{args.decode_buckets}' if args.decode_buckets != flag_defaults['decode_buckets'] else '')
              + ('/cache' if args.compile_cache else '') + ''.join(f'/{item}' for item in args.set),
      'micro_batches': args.micro_batches, 'decode_block': args.decode_block, 'decode_buckets': args.decode_buckets,
      'devices': jax.device_count(),
      'compile_cache': bool(args.compile_cache),
      'jax_version': jax.__version__, 'steps': args.steps,
      'step_time_median_s': round(statistics.median(timed), 4),
      'step_time_mean_s': round(statistics.mean(timed), 4),
      'step_time_min_s': round(min(timed), 4),
      'step_time_median_clean_s': round(statistics.median(clean), 4) if clean else None,
      'clean_steps': len(clean),
      'foreign_cpu_per_step': [None if f is None else round(f, 2) for f in foreign],
      'gen_tokens_per_s': round(sum(timed_tok) / sum(timed), 2),
      'gen_only_tokens_per_s': round(sum(timed_tok) / sum(timed_gen), 2),
      'gen_time_median_s': round(statistics.median(timed_gen), 4),
      'completion_tokens_per_step_mean': round(statistics.mean(timed_tok), 1),
      'peak_rss_mb': round(peak_rss_steps_mb, 1),
      'peak_rss_end_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
      'total_wall_s': round(time.perf_counter() - t_start, 2),
      'step_times_s': [round(x, 4) for x in step_times],
      'gen_times_s': [round(x, 4) for x in gen_times],
      'cpu_count': os.cpu_count(), 'G': G, 'prompts_per_step': P, 'completions_per_step': P * G,
      'max_completion_length': L, 'fixed_length': args.fixed_length, 'beta': args.beta,
      'reward_mean': round(statistics.mean(rewards), 4),
      'compiles_per_step': [b - a for a, b in zip(compiles[:-1], compiles[1:], strict=True)],
      'matmul_peak_gflops': round(peak / 1e9, 1),
      'step_gflops': round(flops['total'] / 1e9, 2),
      'roofline_step_s': round(roofline_s, 4),
      'step_over_roofline': round(statistics.median(timed) / roofline_s, 2),
      'phase_time_s': {k: round(v, 4) for k, v in phase_time.items()},
      'phase_fraction_of_peak': {k: round(flops[k] / v / peak, 3) for k, v in phase_time.items()},
      'model': ({'arch': f'grpo_jax Transformer ({cfg_model.model_type})', 'source': os.path.basename(cfg.model.path),
                 **{k: getattr(cfg_model, k) for k in (*MODEL, 'vocab_size')}} if real
                else {'arch': 'grpo_jax Transformer (Qwen2-shaped)', 'vocab_size': cfg_model.vocab_size, **MODEL})
               | {'n_params': int(n_params), 'dtype': 'float32'},
      **extra,
  }
  sys.stdout.flush()
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
