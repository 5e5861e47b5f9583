"""Pretrained weights in and out: Hugging Face safetensors, official Gemma checkpoints."""
