"""grpo_jax: Group Relative Policy Optimization (DeepSeekMath) in JAX. See README.md for the map of modules."""

__version__ = '0.1.0'
