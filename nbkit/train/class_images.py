"""Prior preservation: check the DreamBooth data before anything loads, and generate class images.

DreamBooth trains the instance images ("sks dog") together with *class* images ("dog") made by the
base model itself, so the model keeps what a plain "dog" looks like. If the class folder holds fewer
than ``num_class_images``, the rest are generated with the base model (class prompt, negative
prompt, steps, CFG scale, batch; one seed per image index, so a re-run makes the same images), under
fp16 autocast on a GPU and fp32 on a CPU. Each image is written atomically with a caption (the class
prompt) next to it, so the next run finds and reuses them. Where they go:

1. ``class_data_dir`` when set;
2. else the user's own regularisation (``is_reg``) subset that holds fewer than ``num_class_images``
   (an empty folder included): the folder the user named is where the class images belong, as
   diffusers' ``class_data_dir`` is; images already there are kept and only new names are added;
3. else a kohya regularisation folder ``<reg_data_dir or reg next to the first instance folder>/1_<class>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.images import DatasetError, list_images
from nbkit.data.importer import parse_kohya_folder_name


@dataclass(frozen=True)
class ClassImagePlan:
    """Where class images live, with which prompt, and how many are still missing."""

    folder: Path
    prompt: str
    existing: int
    missing: int
    caption_extension: str = ".txt"


def _has_caption(image: Path, extension: str) -> bool:
    caption = image.with_suffix(extension)
    return caption.is_file() and bool(caption.read_text(encoding="utf-8", errors="ignore").strip())


def check_dreambooth_data(config, datasets: list[DatasetSpec]) -> list[DatasetSpec]:
    """Fail before any model loads if an instance image would have no caption (no caption file, no
    class tokens, no instance_prompt); return the datasets with instance_prompt filled in."""
    out = []
    instances = 0
    for dataset in datasets:
        subsets = []
        for sub in dataset.subsets:
            instances += not sub.is_reg
            may_be_empty = sub.is_reg and bool(config.num_class_images)  # checked against the plan below
            subsets.append(_checked_subset(sub, None if sub.is_reg else config.instance_prompt, may_be_empty))
        out.append(replace(dataset, subsets=subsets))
    if not instances:
        raise ConfigError("no instance images: every subset is a regularisation subset (is_reg): add the images to "
                          "learn as a subset without is_reg, or a '10_sks dog' folder in train_data_dir")
    plan = class_image_plan(config, out)  # raises when the class or the folder cannot be told
    for sub in (s for d in out for s in d.subsets if s.is_reg):
        if (plan is None or not _same_folder(sub.image_dir, plan.folder)) and not _count(sub.image_dir):
            raise DatasetError(f"{sub.image_dir}: no images (.png/.jpg/.jpeg/.webp/.bmp) found: add class images, "
                               f"or set num_class_images (and class_data_dir = '{sub.image_dir}') to generate them")
    return out


def _same_folder(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _checked_subset(sub: SubsetSpec, instance_prompt: str | None, may_be_empty: bool = False) -> SubsetSpec:
    images = list_images(sub.image_dir) if sub.image_dir.is_dir() or not may_be_empty else []
    if not images:
        if may_be_empty:
            return sub
        raise DatasetError(f"{sub.image_dir}: no images (.png/.jpg/.jpeg/.webp/.bmp) found: check image_dir")
    bare = [p for p in images if not _has_caption(p, sub.caption_extension)]
    if not bare or sub.class_tokens:
        return sub
    if instance_prompt:
        return replace(sub, class_tokens=instance_prompt)
    what = f"{len(bare)} of {len(images)} images have no {sub.caption_extension} caption (e.g. {bare[0].name})"
    if sub.is_reg:
        raise ConfigError(f"{sub.image_dir}: class images: {what} and the subset has no class tokens: name the "
                          "folder 'N_class' (e.g. '1_dog') in reg_data_dir, set class_tokens = 'dog', or write captions")
    raise ConfigError(
        f"{sub.image_dir}: {what} and there is no instance token: name the folder 'N_identifier class' "
        "(e.g. '10_sks dog') in train_data_dir, set class_tokens = 'sks dog' for this subset, "
        "set instance_prompt = 'photo of sks dog', or write the captions"
    )


def _class_word(sub: SubsetSpec) -> str | None:
    kohya = parse_kohya_folder_name(sub.image_dir.name)
    if kohya.identifier and kohya.class_name:
        return kohya.class_name
    words = (sub.class_tokens or "").split(maxsplit=1)
    return words[1] if len(words) == 2 else None


def class_prompt_for(config, datasets: list[DatasetSpec], target: SubsetSpec | None = None) -> str:
    """``class_prompt``, else the class tokens of the regularisation subset being filled (kohya's
    '1_dog'), else the class word of 'N_identifier class' instance folders (if they agree)."""
    if config.class_prompt:
        return config.class_prompt
    if target is not None and target.class_tokens:
        return target.class_tokens
    classes = {_class_word(s) for d in datasets for s in d.subsets if not s.is_reg}
    if len(classes) == 1 and None not in classes:
        return classes.pop()
    found = ", ".join(sorted(c for c in classes if c)) or "none"
    raise ConfigError(f"num_class_images={config.num_class_images} needs class_prompt (e.g. 'photo of a dog'); "
                      f"the instance folders name these classes: {found}: set class_prompt")


def _slug(prompt: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9 _-]", " ", prompt)).strip()[:60] or "class"


def _count(folder: Path) -> int:
    return len(list_images(folder)) if folder.is_dir() else 0


def _reg_subset_to_fill(config, datasets: list[DatasetSpec]) -> tuple[bool, SubsetSpec | None]:
    """(whether the user has regularisation subsets, the one short of ``num_class_images``)."""
    regs = [s for d in datasets for s in d.subsets if s.is_reg]
    short = [s for s in regs if _count(s.image_dir) < config.num_class_images]
    if len({s.image_dir.resolve() for s in short}) > 1:
        names = ", ".join(str(s.image_dir) for s in short)
        raise ConfigError(f"num_class_images={config.num_class_images}: several regularisation (is_reg) folders hold "
                          f"fewer images ({names}): set class_data_dir to the one to fill with class images")
    return bool(regs), (short[0] if short else None)


def class_image_plan(config, datasets: list[DatasetSpec], base_dir: Path | None = None) -> ClassImagePlan | None:
    """Where class images go and how many are missing (see the module docstring for the folder).

    None without prior-preservation generation (``num_class_images`` 0), and when the user's
    regularisation subsets already hold ``num_class_images`` images each."""
    if not config.num_class_images:
        return None
    regs = [s for d in datasets for s in d.subsets if s.is_reg]
    if config.class_data_dir:
        folder = Path(config.class_data_dir).expanduser()
        folder = folder if folder.is_absolute() or base_dir is None else base_dir / folder
        target = next((s for s in regs if _same_folder(s.image_dir, folder)), None)
    else:
        has_regs, target = _reg_subset_to_fill(config, datasets)
        if target is None and has_regs:
            return None  # the user's class images are all there
        folder = target.image_dir if target is not None else _default_class_folder(config, datasets)
    prompt = class_prompt_for(config, datasets, target)
    if target is None and not config.class_data_dir:
        folder = folder / f"1_{_slug(prompt)}"
    existing = _count(folder)
    extension = target.caption_extension if target is not None else ".txt"
    return ClassImagePlan(folder, prompt, existing, max(0, config.num_class_images - existing), extension)


def _default_class_folder(config, datasets: list[DatasetSpec]) -> Path:
    """The parent of the kohya ``1_<class>`` folder: reg_data_dir, else ``reg`` next to the first instances."""
    if config.reg_data_dir:
        return Path(config.reg_data_dir).expanduser()
    first = next(s for d in datasets for s in d.subsets if not s.is_reg)
    return first.image_dir.parent / "reg"


def add_class_subset(datasets: list[DatasetSpec], plan: ClassImagePlan) -> list[DatasetSpec]:
    """The class folder as a regularisation subset of the first dataset (unless a subset already reads it)."""
    if any(_same_folder(s.image_dir, plan.folder) for d in datasets for s in d.subsets):
        return datasets
    sub = SubsetSpec(image_dir=plan.folder, class_tokens=plan.prompt, caption_extension=plan.caption_extension,
                     is_reg=True)
    return [replace(datasets[0], subsets=[*datasets[0].subsets, sub]), *datasets[1:]]


@torch.no_grad()
def generate_class_images(pipeline, plan: ClassImagePlan, config, size: tuple[int, int], device,
                          progress: bool = True) -> list[Path]:
    """Write the missing class images (PNG + ``.txt`` caption) into ``plan.folder``; return their paths."""
    from tqdm.auto import tqdm

    from nbkit.io import atomic_write_text
    from nbkit.train.sampling import make_sampler, save_png

    device = torch.device(device)
    names = _free_names(plan.folder, plan.existing, plan.missing, plan.caption_extension)
    scheduler, bar_config = pipeline.scheduler, dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.scheduler = make_sampler(config.class_image_sampler, scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    written: list[Path] = []
    batch = config.class_image_batch_size
    try:
        for start in tqdm(range(0, plan.missing, batch), desc="class images", unit="batch", disable=not progress):
            chunk = names[start:start + batch]
            generators = [torch.Generator().manual_seed(config.seed + index) for index, _ in chunk]
            negative = [config.class_negative_prompt] * len(chunk) if config.class_negative_prompt else None
            with autocast:
                images = pipeline(prompt=[plan.prompt] * len(chunk), negative_prompt=negative, width=size[0],
                                  height=size[1], num_inference_steps=config.class_image_steps,
                                  guidance_scale=config.class_image_guidance, generator=generators).images
            for (_, path), image in zip(chunk, images):
                atomic_write_text(path.with_suffix(plan.caption_extension), plan.prompt + "\n")
                written.append(save_png(image, path, parameters=_parameters(plan.prompt, config, size)))
    finally:
        pipeline.scheduler = scheduler
        pipeline.set_progress_bar_config(**bar_config)
    return written


def _free_names(folder: Path, first_index: int, count: int, caption_extension: str = ".txt") -> list[tuple[int, Path]]:
    """(seed index, path) for each missing image; indices continue after the images already there and
    skip every name whose image or caption exists, so no file already in the folder is overwritten."""
    out, index = [], first_index
    while len(out) < count:
        path = folder / f"class_{index:05d}.png"
        if not path.exists() and not path.with_suffix(caption_extension).exists():
            out.append((index, path))
        index += 1
    return out


def _parameters(prompt: str, config, size: tuple[int, int]) -> str:
    negative = f"\nNegative prompt: {config.class_negative_prompt}" if config.class_negative_prompt else ""
    return (f"{prompt}{negative}\nSteps: {config.class_image_steps}, Sampler: {config.class_image_sampler}, "
            f"CFG scale: {config.class_image_guidance}, Size: {size[0]}x{size[1]}")


def prepare_class_images(config, datasets: list[DatasetSpec], pipeline, device, main_process: bool = True,
                         wait=None, base_dir: Path | None = None) -> list[DatasetSpec]:
    """Generate what is missing (main process only; ``wait`` is the other processes' barrier) and
    return the datasets with the class folder added as a regularisation subset."""
    plan = class_image_plan(config, datasets, base_dir)
    if plan is None:
        return datasets
    if plan.missing and main_process:
        size = datasets[0].resolution
        generate_class_images(pipeline, plan, config, size, device)
    if wait is not None:
        wait()
    return add_class_subset(datasets, plan)
