"""Latent caching: same loss cached or not, stale entries never reused, steps counted once."""

from __future__ import annotations

import random

import torch
from PIL import Image

from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.latents import LatentCache
from nbkit.data.train_data import collect_items, steps_per_epoch
from nbkit.demo import make_sample_dataset
from nbkit.train.config import LoRATrainConfig
from nbkit.train.lora import train_lora


def _config(model_dir, tmp_path, **overrides):
    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), resolution=64,
                  network_dim=2, network_alpha=2.0, learning_rate=1e-3, train_batch_size=2, max_train_steps=1,
                  optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False, seed=5)  # fmt: skip
    values.update(overrides)
    return LoRATrainConfig(**values)


def _datasets(images, resolution=64, **subset):
    return [DatasetSpec(resolution=(resolution, resolution), batch_size=2, enable_bucket=True, min_bucket_reso=64,
                        max_bucket_reso=256, bucket_reso_steps=64,
                        subsets=[SubsetSpec(image_dir=images, caption_extension=".txt", **subset)])]  # fmt: skip


def test_cached_and_uncached_runs_give_the_same_first_loss(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    losses = []
    for cache in (True, False):
        config = _config(model_dir, tmp_path, cache_latents=cache)
        losses.append(train_lora(config, _datasets(images, flip_aug=True), device="cpu").losses[0])
    # CPU fp32, same seeds: the latents are sampled with per-image seeds, so only float noise remains.
    assert abs(losses[0] - losses[1]) < 1e-6, losses


def test_disk_cache_reused_and_invalidated(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    items, _ = collect_items(_datasets(images))
    cache_dir = tmp_path / "cache"
    first = LatentCache(items, pipe.vae, "cpu", cache_dir)
    first.fill()
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == len(items)

    threaded = LatentCache(items, pipe.vae, "cpu", workers=2)  # decoding in threads changes nothing
    threaded.fill()
    assert all(torch.equal(threaded.memory[k][0], first.memory[k][0]) for k in first.memory)

    again = LatentCache(items, pipe.vae, "cpu", cache_dir)
    encoded = []
    again.encode = lambda pixels, keys: encoded.append(keys) or LatentCache.encode(again, pixels, keys)
    again.fill()
    assert encoded == [] and torch.equal(again.memory[(0, False)][0], first.memory[(0, False)][0])

    # Edit one image: only its entry is re-encoded.
    Image.new("RGB", (64, 64), (1, 2, 3)).save(items[0].image)
    edited = LatentCache(items, pipe.vae, "cpu", cache_dir)
    edited.encode = lambda pixels, keys: encoded.append(keys) or LatentCache.encode(edited, pixels, keys)
    edited.fill()
    assert [k for keys in encoded for k in keys] == [(0, False)]

    # Another VAE (one weight changed): every entry is new.
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(0.5)
    other = LatentCache(items, pipe.vae, "cpu", cache_dir)
    assert all(other.disk_key((i, False)) != first.disk_key((i, False)) for i in range(len(items)))


def test_trainer_runs_exactly_the_counted_steps(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    Image.new("RGB", (192, 64), (200, 10, 10)).save(images / "wide.png")  # a second bucket
    (images / "wide.txt").write_text("sks, wide")
    datasets = _datasets(images, resolution=128, num_repeats=3)
    items, _ = collect_items(datasets)
    assert {it.bucket.reso for it in items} == {(128, 128), (192, 64)}
    per_epoch = steps_per_epoch(items)
    assert per_epoch == 18 + 2  # 12 squares x3 -> 18 batches of 2; 1 wide x3 -> 2 batches
    from nbkit.data.check import check_dataset

    report = check_dataset(datasets, epochs=2, progress=False)
    assert (report.steps_per_epoch, report.total_steps) == (per_epoch, 2 * per_epoch)
    assert report.buckets == [((128, 128), 12, 36), ((192, 64), 1, 3)]
    assert "192x64: 1 (3 with repeats)" in report.table()
    config = _config(model_dir, tmp_path, max_train_epochs=2, max_train_steps=999)
    assert train_lora(config, datasets, device="cpu").steps == 2 * per_epoch


def test_color_aug_and_random_crop_encode_fresh_pixels(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=80)
    items, _ = collect_items(_datasets(images, random_crop=True, color_aug=True))
    cache = LatentCache(items, pipe.vae, "cpu")
    cache.fill()
    assert cache.memory == {}  # nothing cacheable
    a, _ = cache.batch([(0, False)], random.Random(1))
    b, _ = cache.batch([(0, False)], random.Random(2))
    assert a.shape == (1, 4, 8, 8) and not torch.equal(a, b)


def test_alpha_mask_and_validation_split(tiny_model_dirs, tmp_path):
    from nbkit.train.hooks import TrainHooks

    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))  # left half opaque
    rgba.save(images / "masked.png")
    (images / "masked.txt").write_text("sks, half")
    datasets = _datasets(images, alpha_mask=True)
    datasets[0].validation_split = 0.25
    items, validation = collect_items(datasets, seed=1)
    assert len(validation) == 3 and len(items) == 10
    masked = next(i for i, it in enumerate(items + validation) if it.image.name == "masked.png")
    from nbkit.data.train_data import load_pixels

    _, mask = load_pixels((items + validation)[masked], with_mask=True)
    assert mask[:, :30].min() == 1.0 and mask[:, 34:].max() == 0.0

    seen = []

    class Record(TrainHooks):
        def on_validation(self, step, loss):
            seen.append((step, loss))

    config = _config(model_dir, tmp_path, max_train_epochs=2, max_train_steps=999)
    result = train_lora(config, datasets, hooks=Record(), device="cpu")
    assert [s for s, _ in seen] == [result.steps // 2, result.steps] and all(loss > 0 for _, loss in seen)
