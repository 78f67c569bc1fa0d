"""File formats other Stable Diffusion tools read: original single files, kohya LoRA."""
