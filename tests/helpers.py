"""What several test files build: tiny models with random weights, GRPO batches, a compiled train step, the prefix-
resampling test policy and its rollouts, a tiny Hugging Face model directory. Test files import from here, never from
each other (a test module's import runs its module-level code and drags its fixtures along)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tasks import generate_split, vocabulary
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models import hf, lora
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.train_state import init_state, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.sampling import make_sampler

# --- a one-device train step (test_memory, test_losses, test_lr_scale, test_trim) ------------------------------

MESH = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
HPARAMS = {'beta': np.float32(0.04)}  # what the GRPO loss reads; the SFT loss ignores it


def host_params(num_layers=1, d_model=32, mlp_dim=64, vocab=40, **dtypes):
  """(graphdef, params) of a small Transformer with random numpy weights."""
  cfg = ModelConfig(vocab_size=vocab, d_model=d_model, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=mlp_dim, **dtypes)
  # Abstract build filled with random numpy weights: eager init costs seconds on CPU, and numpy gives every
  # init_state fresh device buffers (the train step donates its state).
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)
  draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'  # noqa: E731
                          else 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params)))
  return graphdef, params


def grpo_batch(n, p, c, vocab=40, seed=0) -> Rollout:
  """[n, .]: left-padded prompts [n, p], right-padded completions [n, c] of random lengths (so micro-batches differ
  in tokens)."""
  rng = np.random.default_rng(seed)
  prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
  completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (n, 1))).astype(np.int32)
  old = (-3.0 + 0.5 * rng.standard_normal((n, c))).astype(np.float32)
  return Rollout(np.where(prompt_mask, rng.integers(1, vocab, (n, p)), 0).astype(np.int32), prompt_mask,
                 np.where(completion_mask, rng.integers(1, vocab, (n, c)), 0).astype(np.int32), completion_mask,
                 old, old + 0.1, rng.standard_normal(n).astype(np.float32))


def compiled_step(graphdef, params, tx, loss_fn, batch, options=None, **kwargs):
  """(compiled train step, a fresh state for it); the compiled step also reports its memory plan."""
  state = init_state(params, tx, MESH)
  step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, MESH), sharding.batch_sharding(MESH), MESH,
                         **kwargs)
  return step.lower(state, batch, HPARAMS).compile(options), state


# --- model variants of the grouped forward (test_shared_prompt, test_packing) ---------------------------------

BASE = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
CASES = {  # model config, LoRA adapters, logprob chunk, remat
    'plain': (ModelConfig(**BASE), None, 0, 'none'),
    'plain_chunked_remat': (ModelConfig(**BASE), None, 3, 'full'),
    'qk_norm_qkv_bias': (ModelConfig(**BASE, qk_norm=True, qkv_bias=True), None, 0, 'save_dots'),
    'sliding_window': (ModelConfig(**BASE, sliding_window=4), None, 0, 'none'),
    'sliding_qk_chunked': (ModelConfig(**BASE, sliding_window=3, qk_norm=True, qkv_bias=True), None, 4, 'full'),
    'lora': (ModelConfig(**BASE), lora.LoraConfig(4, 8.0, tuple(lora.TARGETS)), 0, 'none'),
    'lora_chunked_remat': (ModelConfig(**BASE), lora.LoraConfig(4, 8.0, tuple(lora.TARGETS)), 3, 'full'),
}


def build(cfg: ModelConfig, lora_cfg: lora.LoraConfig | None = None):
  """(graphdef, params) with random weights of a visible size (LoRA B too, so adapters change the outputs)."""
  model = nnx.eval_shape(lambda: lora.transformer(cfg, nnx.Rngs(0), lora_cfg))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'  # noqa: E731
                          else 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params)))
  return graphdef, params


# --- the prefix-resampling test policy and its rollouts (test_prefix_credit, test_trim) -----------------------

# A random model with peaked logits, on the task's character tokenizer; several characters end a row so outputs
# differ in length. C: the completion budget; CUTS: the prefix cut fractions.
C = 12
CUTS = (0.3, 0.6)


# Fixtures under their own names, so a test file imports them (tokenizer_fixture, policy_fixture) without its test
# arguments shadowing an import.
@pytest.fixture(scope='module', name='tokenizer')
def tokenizer_fixture():
  return build_tokenizer(vocabulary())


@pytest.fixture(scope='module', name='policy')
def policy_fixture(tokenizer):
  """(graphdef, params, stop ids: EOS and the characters 0-3)."""
  cfg = ModelConfig(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)
  draw = lambda path, x: jnp.asarray((1.0 + 0.2 * rng.standard_normal(x.shape)) if str(path[-1].key) == 'scale'  # noqa: E731
                                     else (1.0 if str(path[-1].key) == 'embed' else 0.3) * rng.standard_normal(x.shape),
                                     x.dtype)
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params)))
  stops = tuple(tokenizer(ch, add_special_tokens=False)['input_ids'][0] for ch in '0123')
  return graphdef, params, (tokenizer.eos_token_id, *stops)


def left_pad(rows, width, pad):
  """Token lists -> ([len(rows), width] tokens, mask), each row's tokens at the right end."""
  tokens, mask = np.full((len(rows), width), pad, np.int32), np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if r:
      tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return tokens, mask


@functools.cache
def cached_sampler(graphdef, eos, pad, **static):
  """The policy's sampler with a budget of C tokens, one per setting (each compiles once)."""
  return make_sampler(graphdef, max_new_tokens=C, eos_id=eos, pad_id=pad, **static)


def char_reward(texts, answers):
  """Deterministic and varied: the character codes' sum mod 5, over 4."""
  return np.array([(sum(map(ord, t)) % 5) / 4 for t in texts], np.float32)


def policy_rollout(tokenizer, policy, greedy_rollout):
  """Six outputs in groups of two. Sampled: two per prompt of three. Greedy: one per prompt of six (a greedy group of
  one prompt would be two equal outputs, all advantages 0); the rows' own prompts are what the continuations read,
  and the test reward ignores answers."""
  graphdef, params, eos = policy
  examples = generate_split('train', 6, seed=1)[:6 if greedy_rollout else 3]
  prompts, prompt_mask = left_pad([tokenizer(f'Q: {e.question}\nA: ', add_special_tokens=False)['input_ids']
                                   for e in examples], 64, tokenizer.pad_token_id)
  split = TokenizedSplit(prompts[:3], prompt_mask[:3], np.zeros((3, 0), np.int32), np.zeros((3, 0), np.int32),
                         [e.answer for e in examples[:3]])
  group = 1 if greedy_rollout else 2
  sampler = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=group, greedy=greedy_rollout)
  out = sampler(params, prompts, prompt_mask, jax.random.key(3))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  n = tokens.shape[0]
  rollout = Rollout(np.repeat(prompts, group, 0), np.repeat(prompt_mask, group, 0), tokens, mask,
                    np.zeros((n, C), np.float32), np.zeros((n, C), np.float32), np.zeros(n, np.float32))
  return rollout, split


# --- a tiny Hugging Face model directory (test_hf_train, test_eval_cli) ----------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def save_tiny_model(path):
  """A tiny random Llama with a character tokenizer and a chat template, as a Hugging Face directory at `path`."""
  tokenizer = build_tokenizer(['user', 'assistant', 'system'])
  tokenizer.chat_template = CHAT_TEMPLATE
  cfg = ModelConfig(model_type='llama', vocab_size=len(tokenizer) + 3, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64)
  hf.save_model(Transformer(cfg, nnx.Rngs(0)), cfg, str(path))
  tokenizer.save_pretrained(str(path))
  return path
