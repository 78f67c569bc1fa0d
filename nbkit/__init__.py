"""nbkit: train Stable Diffusion add-ons (LoRA, DreamBooth, hypernetworks) on a free Colab GPU."""

from nbkit._version import __version__
from nbkit.runtime import quiet_library_noise

# Other libraries' notices that are noise in every command and notebook cell (torchvision fallbacks,
# diffusers' empty "kept in float32" list, bitsandbytes' 4-bit CPU kernel and its Hub lookup): each is
# dropped by its own text, before any of those libraries is imported. See nbkit.runtime.NOISE.
quiet_library_noise()

__all__ = ["__version__"]
