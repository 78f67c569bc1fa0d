"""nbkit: train Stable Diffusion add-ons (LoRA, DreamBooth, hypernetworks) on a free Colab GPU."""

from nbkit._version import __version__

__all__ = ["__version__"]
