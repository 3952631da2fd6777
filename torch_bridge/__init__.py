"""Bridge between Hugging Face / torch checkpoints (safetensors, GGUF) and iva-jax params."""
