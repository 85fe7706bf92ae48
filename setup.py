from setuptools import find_packages, setup

setup(
    name='grpo_jax',
    version='0.1.0',
    description='Group Relative Policy Optimization (DeepSeekMath) in JAX: readable, shardable, reproducible.',
    packages=find_packages(include=['grpo_jax', 'grpo_jax.*', 'configs']),  # configs: derived ones import default
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
        'safetensors>=0.4',  # Hugging Face weights in and out (never pickle)
        'gguf>=0.10',  # llama.cpp .gguf files as model sources (grpo_jax/models/gguf.py); numpy only
        'tensorflow-datasets>=4.9.8',  # dataset builders; array_record format, no TensorFlow needed
        'array-record>=0.5',
        'math-verify>=0.7',  # MATH answer equivalence
        'jinja2>=3.1',  # chat templates
        'scipy',  # accuracy intervals and paired tests (grpo_jax/pipeline/stats.py)
        'matplotlib',  # grpo_jax/report.py's plots (Agg, no display)
    ],
    extras_require={
        # torch (CPU build when pinned) is only the reference in the transformers parity tests.
        # nbclient / nbformat / ipykernel execute the notebooks (tests/test_notebook.py).
        # accelerate: transformers loads a .gguf model only with it (tests/test_gguf.py's reference).
        'test': ['pytest>=8', 'ruff>=0.6', 'torch==2.13.0', 'nbclient', 'nbformat', 'ipykernel', 'accelerate'],
    },
)
