"""Experiments made of whole training runs, each a fresh `python -m grpo_jax.train` process.

  python -m grpo_jax.experiments.paper_table   # SFT, SFT -> GRPO, SFT -> PPO and the compute-matched SFT control
  python -m grpo_jax.experiments.group_size    # held-out accuracy against G, at equal steps and equal sampled tokens

runs.py launches and reads the runs (resumable, wall time and peak RSS per process); plots.py draws the sweeps.
"""
