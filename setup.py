from setuptools import find_packages, setup

setup(
    name="rosa2_jax",
    version="0.1.0",
    description="ROSA2 test-time co-adaptation (Words & Weights) in JAX",
    python_requires=">=3.10",
    # The kernels live in the top-level kernels/ folder and install as rosa2_jax.kernels: a top-level
    # package named `kernels` would collide with the PyPI project of that name.
    packages=find_packages(include=["rosa2_jax", "rosa2_jax.*", "experiments", "experiments.*"]) + ["rosa2_jax.kernels"],
    package_dir={"rosa2_jax.kernels": "kernels"},
    package_data={"rosa2_jax.kernels": ["*.cc", "*.h"]},  # the CPU kernels' sources, compiled on first use
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "transformers>=4.56,<6",
        "tokenizers>=0.21,<0.24",
        "jinja2>=3.1,<4",  # transformers' apply_chat_template renders chat templates with it
        "datasets>=3.0,<6",
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "gguf>=0.16,<0.20",
        "safetensors>=0.4.3,<0.9",
        "huggingface-hub>=0.30,<3",
        "jaxtyping>=0.2.36,<0.4",
        "tqdm>=4.66,<5",
        "math-verify>=0.7,<1",
        "openai>=1.40,<4",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # torch is the parity reference (HF transformers logits and generate), never a runtime dependency.
        "test": ["pytest>=8,<10", "torch==2.13.0"],
    },
)
