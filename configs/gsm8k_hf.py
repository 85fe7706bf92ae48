r"""GRPO on GSM8K train from a local Hugging Face model, with the paper's hyper-parameters where they apply.

  python -m grpo_jax.train --config configs/gsm8k_hf.py --workdir /ckpt/grpo_gsm8k \
      --config.model.path=/models/deepseek-math-7b-instruct
  python -m grpo_jax.train --config configs/gsm8k_hf.py:tiny --workdir /tmp/t --config.model.path=/tmp/tiny_llama

DeepSeekMath (Sec. 4.1): lr 1e-6, KL coefficient 0.04, 64 outputs per question, max length 1024, batch 1024,
a single policy update per exploration stage. This config starts RL from the loaded (instruct) model: no SFT.
Accuracy is reported on GSM8K test with the gsm8k verifier; the trained policy is exported to
<workdir>/hf_model.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  configs/default.py holds the full schema; this file sets what differs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config()

  c.task = ml_collections.ConfigDict()
  c.task.name = 'gsm8k'  # 'gsm8k' | 'math' | 'math500' | 'cmath' | 'jsonl' (grpo_jax/data/datasets.py)
  c.task.train_split = 'train'
  c.task.test_split = 'test'
  c.task.source_dir = ''  # '' = the JSONL shipped in data/; or a directory with the same files
  c.task.num_val = 0  # held out from train for SFT early stopping (no SFT here)
  c.task.num_test = 0  # 0 = the whole test split (1319 problems)
  c.task.prompt_template = 'cot'  # question + "Please reason step by step, and put your final answer within \boxed{}."
  c.task.chat = 'auto'  # the tokenizer's chat template when it has one (instruct models)
  c.task.verifier = 'gsm8k'  # grpo_jax/rewards/verifiers.py
  c.task.skip_long_prompts = True  # drop (and count) prompts longer than max_prompt_len
  # for task.name == 'jsonl': any dataset as JSONL
  c.task.train_file = ''
  c.task.test_file = ''
  c.task.question_field = 'question'
  c.task.answer_field = 'answer'
  c.task.solution_field = ''
  c.task.answer_from_solution = ''  # '' | 'gsm8k' (text after ####) | 'boxed' (last \boxed{})

  c.model = ml_collections.ConfigDict()
  c.model.path = ''  # local HF model directory (config.json, *.safetensors, tokenizer); required
  c.model.param_dtype = 'float32'  # master weights
  c.model.dtype = 'bfloat16'  # compute dtype
  c.model.remat = 'none'  # 'none' | 'full' | 'save_dots' (configs/default.py)
  c.model.logprob_chunk = 0  # > 0: LM head + logprobs over this many positions at a time

  c.max_prompt_len = 512  # tokens, chat template included
  c.max_new_tokens = 1024  # the paper's max length
  c.decode_block = 0  # 128 decodes faster, but the 7B plan shows the sampler holding every block's cache (16 -> 58 GiB)

  c.sft.max_steps = 0  # start RL from the loaded model

  c.rl.num_steps = 500
  c.rl.num_prompts = 16  # x G = 1024 outputs per step, the paper's batch
  c.rl.group_size = 64  # G
  c.rl.num_epochs = 1  # one update per exploration stage
  c.rl.num_minibatches = 1
  c.rl.clip_eps = 0.2
  c.rl.beta = 0.04  # KL coefficient
  c.rl.kl_estimator = 'k3'
  c.rl.reward = 'gsm8k'  # rule verifier: 1 if the final answer matches
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0
  c.rl.lr = 1e-6
  c.rl.warmup_steps = 0
  c.rl.schedule = 'constant'
  c.rl.weight_decay = 0.1
  c.rl.grad_clip = 1.0

  c.eval.batch_size = 64
  c.checkpoint_every = 25
  c.export_hf = True
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
