r"""GRPO on GSM8K train from a local Hugging Face model, with the paper's hyper-parameters where they apply.

  python -m grpo_jax.train --config configs/gsm8k_hf.py --workdir /ckpt/grpo_gsm8k \
      --config.model.path=/models/deepseek-math-7b-instruct
  python -m grpo_jax.train --config configs/gsm8k_hf.py:tiny --workdir /tmp/t --config.model.path=/tmp/tiny_llama

DeepSeekMath (Sec. 4.2): lr 1e-6, KL coefficient 0.04, 64 outputs per question, max length 1024, batch 1024,
a single policy update per exploration stage. This config starts RL from the loaded (instruct) model: no SFT.
Accuracy is reported on GSM8K test with the gsm8k verifier; the trained policy is exported to
<workdir>/hf_model.
"""
import ml_collections

from configs import default  # the full schema, every knob's default; this file sets what differs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config()

  c.task.name = 'gsm8k'  # 'gsm8k' | 'math' | 'math500' | 'cmath' | 'jsonl' (grpo_jax/data/datasets.py)
  c.task.num_val = 0  # nothing held out for SFT early stopping: there is no SFT here
  c.task.num_test = 0  # 0 = the whole test split (1319 problems)
  c.task.prompt_template = 'cot'  # question + "Please reason step by step, and put your final answer within \boxed{}."
  c.task.chat = 'auto'  # the tokenizer's chat template when it has one (instruct models)
  c.task.verifier = 'gsm8k'  # grpo_jax/rewards/verifiers.py: the paper's GSM8K answer rules
  c.task.skip_long_prompts = True  # a few GSM8K prompts are long; drop (and count) them rather than stop

  # The architecture comes from model.path's config.json, so the embedded model's fields go (a config that
  # writes one out, deepseekmath_7b.py, is checked against the checkpoint).
  c.model = ml_collections.ConfigDict({k: c.model[k] for k in ('path', 'param_dtype', 'remat', 'logprob_chunk')})
  c.model.dtype = 'bfloat16'  # compute dtype; master weights stay float32

  c.max_prompt_len = 512  # tokens, chat template included
  c.max_new_tokens = 1024  # the paper's max length
  # decode_block stays 0: larger blocks decode faster but XLA gives each block's loop its own KV cache buffer
  # (the 7B plan: benchmarks/RESULTS.md). So decode_buckets stays 1: it compacts rows at block boundaries.

  c.sft.max_steps = 0  # start RL from the loaded model

  c.rl.num_steps = 500
  c.rl.num_prompts = 16  # x G = 1024 outputs per step, the paper's batch
  c.rl.group_size = 64  # G
  c.rl.beta = 0.04  # the paper's KL coefficient
  c.rl.reward = 'gsm8k'  # rule verifier: 1 if the final answer matches
  c.rl.lr = 1e-6  # the paper's
  c.rl.weight_decay = 0.1

  c.eval.batch_size = 64  # prompts of 512 + 1024 tokens: a smaller decoding batch
  c.checkpoint_every = 25  # steps are long
  c.export_hf = True  # the trained policy as a Hugging Face model, for other tools
  c.cpu_devices = 0  # accelerator hosts: jax's default CPU backend, unused for compute

  if arg == 'tiny':  # CPU test settings for a tiny random model (tests/test_hf_train.py)
    c.task.num_test = 8
    c.max_prompt_len, c.max_new_tokens = 512, 8
    c.decode_block = 4  # two decode loops: the grown-cache path runs end to end
    c.model.dtype = 'float32'
    c.rl.num_steps, c.rl.num_prompts, c.rl.group_size = 2, 2, 4
    c.eval.batch_size = 8
    c.checkpoint_every = 1
  elif arg:
    raise ValueError(f'unknown preset {arg!r}; known: tiny')
  return c
