"""Bridge between Hugging Face / torch checkpoints (safetensors, GGUF) and iva-jax params."""

from torch_bridge.loader import DEFAULT_MODEL, embedded_model_path, load_pretrained, save_pretrained  # noqa: E402,F401
from torch_bridge.weight_map import UnusedWeightsWarning  # noqa: E402,F401
