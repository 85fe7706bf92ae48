r"""DeepSeekMath-Instruct 7B GRPO on GSM8K: the architecture written out, so shapes compile without weights.

  # train (weights from a local copy of deepseek-ai/deepseek-math-7b-instruct)
  python -m grpo_jax.train --config configs/deepseekmath_7b.py --workdir /ckpt/dsm7b \
      --config.model.path=/models/deepseek-math-7b-instruct --config.mesh.fsdp=-1 --config.mesh.data=1

With model.path set, the directory's config.json must describe this same architecture (checked). Without it,
tools that only need shapes (ahead-of-time compiles, memory plans) use the fields below.
"""
import ml_collections

from configs import gsm8k_hf  # GRPO on GSM8K with the paper's settings; this file adds the architecture


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = gsm8k_hf.get_config(arg)
  # DeepSeekMath-7B is a Llama model (config.json of deepseek-math-7b-instruct).
  c.model.model_type = 'llama'
  c.model.vocab_size = 102400
  c.model.d_model = 4096  # hidden_size
  c.model.num_layers = 30
  c.model.num_heads = 32
  c.model.num_kv_heads = 32  # no grouped-query attention
  c.model.head_dim = 128
  c.model.mlp_dim = 11008  # intermediate_size (SwiGLU)
  c.model.rope_theta = 10000.0
  c.model.rms_eps = 1e-6
  c.model.tie_embeddings = False
  c.mesh.data, c.mesh.fsdp = 1, -1  # shard weights and optimizer state over every device
  return c
