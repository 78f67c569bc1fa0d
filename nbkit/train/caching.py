"""What a run encodes once: latents of every image (memory, and disk with cache_latents_to_disk)
and, with a frozen text encoder and fixed captions, the text conditioning."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from nbkit.data.captions import process_caption
from nbkit.data.train_data import caption_options
from nbkit.errors import ConfigError


def cache_latents(config, items, vae, device):
    """Encode every cacheable image once (memory, and disk with cache_latents_to_disk); the VAE
    leaves the GPU when nothing needs it any more (no color_aug/random_crop subsets)."""
    from tqdm.auto import tqdm

    from nbkit.data.latents import LatentCache, cacheable

    disk = config.latent_cache_dir or str(Path(config.output_dir) / "latent_cache")
    latents = LatentCache(items, vae, device, disk if config.cache_latents_to_disk else None,
                          workers=config.max_data_loader_n_workers)
    if config.cache_latents:
        with tqdm(total=len(latents.keys_to_cache()), desc="VAE encode", unit="img") as bar:
            latents.fill(bar.update)
        if all(cacheable(it) for it in items):
            vae.to("cpu")
    return latents


def cache_text(config, items, arch, te_trained: bool):
    """Encode every caption once when the text encoder is frozen and captions never change;
    the text encoder then leaves the GPU (A1111's "unload VAE and CLIP while training")."""
    if not config.cache_text_encoder_outputs:
        return None
    changing = changing_caption_options(items)
    if te_trained or changing:
        why = "the text encoder is trained" if te_trained else f"captions change every step ({', '.join(changing)})"
        raise ConfigError(f"cache_text_encoder_outputs: {why}: turn caching off or set network_train_unet_only")
    captions = [process_caption(it.caption, caption_options(it.subset), random.Random(0)) for it in items]
    cache = {}
    with torch.no_grad():
        for caption in dict.fromkeys(captions):
            cache[caption] = arch.encode([caption])[0].cpu()
    for text_encoder in arch.text_encoders().values():
        text_encoder.to("cpu")
    return [cache[c] for c in captions]


def changing_caption_options(items) -> list[str]:
    """Subset options that make a caption differ from step to step (then text cannot be cached)."""
    return [o for o in ("shuffle_caption", "enable_wildcard", "caption_dropout_rate", "caption_tag_dropout_rate",
                        "caption_dropout_every_n_epochs", "token_warmup_step")
            if any(getattr(it.subset, o) for it in items)]  # fmt: skip
