"""nbkit: train Stable Diffusion add-ons (LoRA, DreamBooth, hypernetworks) on a free Colab GPU."""

import logging

from nbkit._version import __version__

# bitsandbytes warns on import that its optional 4-bit CPU *inference* kernel is missing; nbkit only
# uses its 8-bit optimizers, so the line is noise in every command and notebook cell.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["__version__"]
