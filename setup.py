from setuptools import find_packages, setup

setup(
    name='grpo_jax',
    version='0.1.0',
    description='Group Relative Policy Optimization (DeepSeekMath) in JAX: readable, shardable, reproducible.',
    packages=find_packages(include=['grpo_jax', 'grpo_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7',
        'flax>=0.12',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'ml-collections>=1.0',
        'transformers>=4.50',
        'tokenizers>=0.21',
        'absl-py>=2.0',
        'numpy>=1.26',
        'tqdm>=4.66',
        'tensorboardX>=2.6',
    ],
    extras_require={
        'test': ['pytest>=8', 'ruff>=0.6'],
        'torch-reference': ['torch>=2.6'],  # CPU torch, only for the transformers logit-match tests
    },
)
