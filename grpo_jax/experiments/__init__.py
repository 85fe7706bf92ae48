"""Experiments made of whole training runs, each a fresh `python -m grpo_jax.train` process.

  python -m grpo_jax.experiments.paper_table     # SFT, SFT -> GRPO, SFT -> PPO and the compute-matched SFT control
  python -m grpo_jax.experiments.group_size      # held-out accuracy against G, at equal steps and equal sampled tokens
  python -m grpo_jax.experiments.default_seeds   # the embedded default over seeds, its SFT control, one-knob variants
  python -m grpo_jax.experiments.iterative_rl    # the paper's whole algorithm: which of its parts change the result
  python -m grpo_jax.experiments.prefix_credit   # prefix-resampling credit against outcome advantages, equal tokens

All take --config (path[:preset], default configs/default.py) with --config.<key>=<value> overrides for every run,
and answer --help. runs.py launches and reads the runs (resumable, wall time and peak RSS per process); sweeps.py is
the seed sweeps' flags and JSON lines (default_seeds, iterative_rl, prefix_credit); plots.py draws the sweeps.
Speed and memory measurements of one step stay in benchmarks/.
"""
