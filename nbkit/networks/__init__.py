"""Trainable add-on networks (LoRA/LoCon via peft) injected into diffusers/transformers models."""
