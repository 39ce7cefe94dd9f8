"""Model file formats: Hugging Face checkpoints (config.json + safetensors) and GGUF."""
