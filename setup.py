"""cotsafe_jax: RL for chain-of-thought safety of large reasoning models, in JAX."""
from setuptools import find_packages, setup

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
        "etils[epath]>=1.7,<2",  # workdir and data paths: local, or gs:// with the gcs extra
    ],
    extras_require={
        # the accelerators' compilers, for the `plan` job on any host (TPU: libtpu; NVIDIA: the CUDA plugin + ptxas)
        "plan": ["jax[tpu]>=0.10.2,<0.11", "jax-cuda12-plugin>=0.10.2,<0.11", "nvidia-cuda-nvcc-cu12>=12.6"],
        "test": ["pytest>=8,<10", "torch==2.13.0", "jax[tpu]>=0.10.2,<0.11", "jax-cuda12-plugin>=0.10.2,<0.11",
                 "nvidia-cuda-nvcc-cu12>=12.6",
                 # the Colab notebook, executed top to bottom on CPU in the tests
                 "nbclient>=0.10,<0.11", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
        # gs:// workdirs and data: epath through gcsfs; orbax's checkpoints on GCS also use google-cloud-storage
        "gcs": ["etils[epath-gcs]>=1.7,<2", "google-cloud-storage>=2.14,<4"],
        "tpu": ["jax[tpu]", "etils[epath-gcs]>=1.7,<2", "google-cloud-storage>=2.14,<4"],
        "gpu": ["jax[cuda13]"],
    },
)
