"""BLIP captions through transformers, with kohya's make_captions.py decoding settings.

    from nbkit.tag.blip import BlipCaptionConfig, caption_images
    caption_images("dataset/10_sks", BlipCaptionConfig(prefix="sks"))

kohya runs the original BLIP-large code (timm, fairscale); transformers' ``BlipForConditionalGeneration``
holds the same weights (``Salesforce/blip-image-captioning-large``) without those dependencies.
Like kohya: the image is resized to 384 x 384 ignoring aspect (bicubic) and CLIP-normalised (the
checkpoint's image processor does this), the decoder starts from the prompt ``"a picture of "``
which is removed from the result, nucleus sampling uses top_p 0.9 and repetition penalty 1.1,
beam search uses ``num_beams`` and no penalty, and ``min_length``/``max_length`` count tokens
including the prompt. Any BLIP captioning repo id or a folder saved with ``save_pretrained`` works.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nbkit.data.images import open_rgb
from nbkit.tag.backup import BackupSession
from nbkit.tag.config import DEFAULT_BLIP_MODEL, BlipCaptionConfig
from nbkit.tag.files import caption_path, find_images, load_in_batches, normalize_extension, write_tags
from nbkit.tag.tags import split_tags
from nbkit.tag.wd14 import TagReport

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def with_prefix(prefix: str, caption: str) -> str:
    """Join a prefix and a caption: with ``", "`` unless the prefix ends in whitespace."""
    if not prefix:
        return caption
    if prefix[-1].isspace():
        return (prefix + caption).strip()
    return f"{prefix.rstrip(', ')}, {caption}" if caption else prefix.rstrip(", ")


def strip_prompt(text: str, prompt: str) -> str:
    """Remove the decoder prompt the caption starts with (the tokenizer lower-cases it)."""
    text, prompt = text.strip(), prompt.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):]
    return text.strip()


def load_blip(
    model_id: str = DEFAULT_BLIP_MODEL, cache_dir: str | None = None, device: str | None = None
) -> tuple[Any, Any, str]:
    """``(processor, model, device)``: fp16 on CUDA, fp32 on CPU, in eval mode."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        processor = BlipProcessor.from_pretrained(model_id, cache_dir=cache_dir)
        model = BlipForConditionalGeneration.from_pretrained(model_id, cache_dir=cache_dir, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"{model_id}: cannot load a BLIP captioning model ({err}). Check the id or folder; offline "
            "(HF_HUB_OFFLINE=1 or no network) it must already be in the Hugging Face cache."
        ) from err
    return processor, model.to(device).eval(), device


def generate_captions(processor: Any, model: Any, images: list, config: BlipCaptionConfig) -> list[str]:
    """Captions for a list of PIL images (prompt removed, prefix not yet added)."""
    import torch

    prompt = config.text_prompt.strip()
    text = {"text": [prompt] * len(images)} if prompt else {}
    inputs = processor(images=images, return_tensors="pt", **text)
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in MODEL_INPUTS}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if config.beam_search:
        decoding = {"do_sample": False, "num_beams": config.num_beams, "repetition_penalty": 1.0}
    else:
        decoding = {"do_sample": True, "num_beams": 1, "top_p": config.top_p, "repetition_penalty": 1.1}
    with torch.no_grad():
        out = model.generate(**inputs, max_length=config.max_length, min_length=config.min_length, **decoding)
    return [strip_prompt(t, prompt) for t in processor.batch_decode(out, skip_special_tokens=True)]


def caption_images(
    folder: str | Path,
    config: BlipCaptionConfig | None = None,
    *,
    blip: tuple[Any, Any, str] | None = None,
    backup_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TagReport:
    """Caption every image in ``folder`` with BLIP; ``blip`` reuses a ``load_blip()`` result."""
    import torch
    from tqdm.auto import tqdm

    config = config or BlipCaptionConfig()
    folder, extension, mode = Path(folder), normalize_extension(config.caption_extension), config.existing_captions
    images = find_images(folder, config.recursive)
    report = TagReport(folder, images=len(images))
    todo = [p for p in images if not (mode == "skip" and caption_path(p, extension).is_file())]
    report.skipped = len(images) - len(todo)
    if not todo:  # nothing to caption: do not download or load a model
        if verbose:
            print(report.summary())
        return report
    processor, model, device = blip or load_blip(config.model_id, config.cache_dir, config.device)
    report.provider = f"BLIP on {device}"
    backup = BackupSession(folder, "blip", backup_dir)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc="BLIP", disable=not progress) as bar:
        batches = load_in_batches(todo, open_rgb, max(1, config.batch_size), lambda p, e: report.failed.append((p, str(e))))
        for paths, pictures in batches:
            captions = generate_captions(processor, model, pictures, config) if pictures else []
            for path, caption in zip(paths, captions):
                tags = split_tags(with_prefix(config.prefix, caption))
                report.counts.update(tags)
                report.written += write_tags(caption_path(path, extension), tags, mode, ", ", backup)
            bar.update(len(report.failed) + report.written - bar.n)
    report.seconds, report.backup = time.perf_counter() - start, backup.path
    if verbose:
        print(report.summary())
    return report
