"""After the first GRPO step, later steps compile nothing: shapes are fixed, so no per-step recompilation."""
import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import ConfigDict

from grpo_jax.core.advantages import group_advantages
from grpo_jax.core.logprobs import make_sequence_logprobs_fn
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline.grpo import collect_rollout, grpo_objective, update
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rewards.registry import get_reward_fn
from grpo_jax.rollout.sampling import make_sampler

BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


def test_second_and_third_grpo_steps_compile_nothing():
  tokenizer = build_tokenizer()
  cfg = ModelConfig(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  param_shardings = sharding.tree_shardings(params, mesh)
  opt_cfg = ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0))
  tx = make_optimizer(opt_cfg, 10)
  state = init_state(params, tx, mesh)
  loss_fn = functools.partial(grpo_objective, clip_eps=0.2, beta=0.04, kl_estimator='k3')
  train_step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh),
                               mesh)
  sampler = make_sampler(graphdef, param_shardings=param_shardings, mesh=mesh, max_new_tokens=8,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=1.0,
                         group_size=4)
  ref_fn = make_sequence_logprobs_fn(graphdef, param_shardings=param_shardings, mesh=mesh)
  ref_params = jax.tree.map(lambda x: x.copy(), state.params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, len(tokenizer), (4, 6)).astype(np.int32)
  prompts = TokenizedSplit(tokens, np.ones_like(tokens), tokens[:, :1], tokens[:, :1], ['1', '2', '3', '4'])

  compiles = []
  listener = lambda name, *args, **kwargs: compiles.append(name) if name == BACKEND_COMPILE else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    per_step = []
    for step in range(3):
      before = len(compiles)
      key = jax.random.fold_in(jax.random.key(0), step)
      rollout, _ = collect_rollout(sampler, ref_fn, state.params, ref_params, prompts, key, group_size=4,
                                   tokenizer=tokenizer, reward_fn=get_reward_fn('gsm8k_exact'),
                                   advantage_fn=group_advantages)
      state, metrics = update(train_step, state, rollout, key, num_epochs=2, num_minibatches=2)
      jax.block_until_ready(metrics)
      per_step.append(len(compiles) - before)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert per_step[0] > 0  # the listener does see compilations
  assert per_step[1:] == [0, 0], per_step


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
