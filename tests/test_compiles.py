"""Shapes are fixed, so nothing recompiles per step: later GRPO steps of the trainer's own stage compile nothing,
and a new KL weight (beta) is a new argument value, not a new program."""
import functools

import jax
import numpy as np
from conftest import count_compiles, grpo_steps, load_config
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.setup import build_setup
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout


def test_second_and_third_grpo_steps_compile_nothing():
  cfg = load_config('tiny')  # beta > 0 (the reference forward runs), 2 epochs x 2 minibatches
  cfg.cpu_devices = 0
  per_step, _, _ = grpo_steps(cfg)
  assert per_step[0] > 0  # the listener does see compilations
  assert per_step[1:] == [0, 0], per_step


def test_a_new_beta_runs_without_recompiling():
  """beta enters the train step as an array: two values, one program, and the KL term does change the step."""
  tokenizer = build_tokenizer()
  model_cfg = ModelConfig(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_dim=64)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, params = nnx.split(Transformer(model_cfg, nnx.Rngs(0)), nnx.Param)
  tx = make_optimizer(ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0,
                                      grad_clip=1.0, master_dtype='float32')), 10)
  state = init_state(params, tx, mesh)
  loss_fn = functools.partial(grpo_objective, config=LossConfig(kl_penalty=True))
  step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, len(tokenizer), (4, 6)).astype(np.int32)
  ones = np.ones_like(tokens)
  logprobs = np.full((4, 6), -2.0, np.float32)
  batch = Rollout(tokens, ones, tokens, ones, logprobs, logprobs - 1.0, np.array([1.0, -1.0, 0.5, -0.5], np.float32))
  copy = lambda: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731  (the step donates its state)
  (_, low), first = count_compiles(lambda: step(copy(), batch, {'beta': np.float32(0.0)}))
  (_, high), second = count_compiles(lambda: step(copy(), batch, {'beta': np.float32(0.5)}))
  assert first > 0 and second == 0, (first, second)
  assert float(high['loss']) > float(low['loss'])  # a KL > 0 times a larger beta: a larger loss


def test_compile_cache_dir_lets_a_fresh_process_skip_compiling(tmp_path):
  """What a rerun sees: executables from `config.compile_cache_dir` are loaded, not compiled again."""
  def matmul_chain(x):
    return jax.numpy.tanh(x @ x.T) @ x + 0.123  # a computation no other test compiles

  events = []
  listener = lambda name, **kwargs: events.append(name.rsplit('/', 1)[-1])  # noqa: E731
  jax.monitoring.register_event_listener(listener)
  x = np.ones((16, 8), np.float32)
  try:
    distributed.use_compile_cache(str(tmp_path))
    expected = jax.jit(matmul_chain)(x)
    assert events.count('cache_misses') == 1 and 'cache_hits' not in events
    assert any(tmp_path.iterdir()), 'the first compile should write a cache entry'
    jax.clear_caches()  # forget the in-memory executable, as a new process would
    np.testing.assert_array_equal(jax.jit(matmul_chain)(x), expected)
    assert events.count('cache_misses') == 1 and events.count('cache_hits') == 1, events
  finally:
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update('jax_compilation_cache_dir', None)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    compilation_cache.reset_cache()


def test_the_kl_controller_moves_beta_toward_the_target_without_recompiling():
  cfg = load_config('tiny')
  cfg.cpu_devices, cfg.rl.kl_target, cfg.rl.kl_horizon = 0, 1e-4, 100  # a horizon short enough to see it move
  cfg.rl.pack_buckets = 0  # a batch needing a new packed row count compiles once (test_packing); this is about beta
  setup = build_setup(cfg)
  stage = grpo.make_stage(setup, setup.init_params)
  state, per_step, rows = stage.state, [], []
  for i in range(5):
    (state, metrics), n = count_compiles(lambda: stage.step(state, i))  # noqa: B023
    per_step.append(n)
    rows.append((float(metrics['kl']), float(metrics['beta'])))
  assert rows[0][1] == np.float32(cfg.rl.beta)  # each row logs the beta its step used (a float32 array)
  betas = [b for _, b in rows] + [float(state['kl_controller']['beta'])]  # the checkpointed role: the next step's
  for (kl, _), before, after in zip(rows, betas[:-1], betas[1:], strict=True):
    assert (after > before) == (kl > cfg.rl.kl_target), (kl, before, after)  # up above the target, down below
  assert per_step[2:] == [0, 0, 0], per_step  # beta is an argument of the step, not a constant in it
