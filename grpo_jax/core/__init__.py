"""Pure array math: advantages, the GRPO loss, KL estimators, log-probabilities. jax/numpy only."""
