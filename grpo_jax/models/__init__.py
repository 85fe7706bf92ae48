"""The decoder, its LoRA adapters, the reward model, and Hugging Face checkpoints in and out."""
