"""VAE latents, encoded once: in memory, and optionally on disk (kohya ``cache_latents_to_disk``).

A disk entry is keyed by the image's *content* (sha256 of its bytes), its bucket, resize size,
crop, flip, interpolation and the VAE's identity, so an edited image or another VAE never
reuses a stale latent. Cache files live in nbkit's own folder, never next to the user's images.

The VAE posterior is sampled with noise seeded per image from its place in the config and its
path *inside* the subset folder, never the folder's absolute path: the same data and seed give
the same LoRA wherever the dataset lives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from nbkit.data.train_data import Item, load_pixels

LatentKey = tuple[int, bool]  # (item index, flipped)


def vae_identity(vae) -> str:
    """A fingerprint of the VAE: its config plus a strided sample of every weight tensor."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cacheable(item: Item) -> bool:
    """kohya: color_aug and random_crop change the pixels every epoch, so their latents are not cached."""
    return not (item.subset.color_aug or item.subset.random_crop)


class LatentCache:
    """Encodes items with the VAE once; serves (latent, mask) pairs by ``(index, flipped)``."""

    def __init__(self, items: list[Item], vae, device, disk_dir: str | Path | None = None, batch_size: int = 4,
                 workers: int = 0):
        self.items = items
        self.vae = vae
        self.device = torch.device(device)
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.batch_size = batch_size
        self.workers = workers  # threads that decode images while the VAE encodes (2 vCPUs on Colab)
        self.memory: dict[LatentKey, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._vae_id = vae_identity(vae) if self.disk_dir else ""
        self._content: dict[Path, str] = {}

    def disk_key(self, key: LatentKey) -> str:
        item = self.items[key[0]]
        if item.image not in self._content:
            self._content[item.image] = file_sha256(item.image)
        # the last part names the posterior sample's noise (see _seed_text), which the latent holds
        parts = [self._content[item.image], item.bucket.reso, item.bucket.resized_size, "center", key[1],
                 item.dataset.resize_interpolation, item.subset.alpha_mask, self._vae_id, self._seed_text(key)]  # fmt: skip
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]

    def keys_to_cache(self) -> list[LatentKey]:
        keys = [(i, False) for i, it in enumerate(self.items) if cacheable(it)]
        return keys + [(i, True) for i, it in enumerate(self.items) if cacheable(it) and it.subset.flip_aug]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, keys: list[LatentKey]) -> torch.Tensor:
        """Sample the VAE posterior with noise seeded per image, so a latent does not depend on
        which batch it was encoded in, whether it was cached, or the global RNG."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        eps = torch.stack([
            torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(self._seed(k))) for k in keys
        ]).to(dist.mean.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def _seed(self, key: LatentKey) -> int:
        return int.from_bytes(hashlib.sha256(self._seed_text(key).encode()).digest()[:8], "little") & (2**63 - 1)

    def _seed_text(self, key: LatentKey) -> str:
        """Which image this is, independent of where the dataset lives: the dataset and subset by their
        place in the config, the image by its path inside the subset folder (same data, same LoRA)."""
        item = self.items[key[0]]
        subset = next((i for i, s in enumerate(item.dataset.subsets) if s is item.subset), -1)
        try:
            name = item.image.relative_to(item.subset.image_dir).as_posix()
        except ValueError:
            name = item.image.name
        return f"{item.dataset_index}|{subset}|{name}|{key[1]}"

    def fill(self, progress: Callable[[int], None] | None = None) -> None:
        """Encode every cacheable item (reading the disk cache first), in batches of one bucket;
        with ``workers`` the next batch's images are decoded in threads while the VAE runs."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [k for k in self.keys_to_cache() if not self._load_from_disk(k)]
        if progress:
            progress(len(self.keys_to_cache()) - len(todo))
        by_bucket: dict[tuple, list[LatentKey]] = {}
        for key in todo:
            by_bucket.setdefault(self.items[key[0]].bucket.reso, []).append(key)
        chunks = [keys[i:i + self.batch_size] for keys in by_bucket.values() for i in range(0, len(keys), self.batch_size)]

        def load(chunk):
            return [load_pixels(self.items[i], flip, with_mask=True) for i, flip in chunk]

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            loaded_chunks = pool.map(load, chunks) if self.workers else map(load, chunks)
            for chunk, loaded in zip(chunks, loaded_chunks):
                latents = self.encode(torch.stack([p for p, _ in loaded]), chunk)
                for key, latent, (_, mask) in zip(chunk, latents, loaded):
                    self.memory[key] = (latent.float().cpu(), mask)
                    self._save_to_disk(key)
                if progress:
                    progress(len(chunk))

    def _load_from_disk(self, key: LatentKey) -> bool:
        if not self.disk_dir:
            return False
        path = self.disk_dir / f"{self.disk_key(key)}.safetensors"
        if not path.is_file():
            return False
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        self.memory[key] = (tensors["latent"], tensors.get("mask"))
        return True

    def _save_to_disk(self, key: LatentKey) -> None:
        if not self.disk_dir:
            return
        from nbkit.io import save_safetensors_atomic

        latent, mask = self.memory[key]
        tensors = {"latent": latent.contiguous()} if mask is None else {"latent": latent.contiguous(), "mask": mask}
        save_safetensors_atomic(tensors, self.disk_dir / f"{self.disk_key(key)}.safetensors")

    def batch(self, batch: list[LatentKey], rng) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents (and masks) for a batch: cached ones from memory, the others encoded now."""
        latents, masks = [], []
        for index, flip in batch:
            if (index, flip) in self.memory:
                latent, mask = self.memory[(index, flip)]
            else:  # color_aug / random_crop: fresh pixels every time
                pixels, mask = load_pixels(self.items[index], flip, rng, with_mask=True)
                latent = self.encode(pixels[None], [(index, flip)])[0].float().cpu()
            latents.append(latent)
            masks.append(mask)
        stacked = torch.stack(latents)
        if all(m is None for m in masks):
            return stacked, None
        size = stacked.shape[-2:]
        hw = self.items[batch[0][0]].bucket.reso[::-1]
        full = [m if m is not None else torch.ones(hw) for m in masks]
        mask = torch.nn.functional.interpolate(torch.stack(full)[:, None], size=size, mode="area")
        return stacked, mask
