"""Writing the trained LoRA: kohya file names and full ``ss_*``/``modelspec`` metadata."""

from __future__ import annotations

import time
from pathlib import Path

from nbkit.data.train_data import dataset_dirs, tag_frequency
from nbkit.train.common import save_dtype_for

# LoraTrainingInfo fields that are kohya options of the same name in the training config
_SAME_NAME_FIELDS = (
    "network_dim",
    "network_alpha",
    "conv_dim",
    "conv_alpha",
    "max_train_steps",
    "learning_rate",
    "unet_lr",
    "text_encoder_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "gradient_accumulation_steps",
    "clip_skip",
    "noise_offset",
    "min_snr_gamma",
    "min_timestep",
    "max_timestep",
    "mixed_precision",
    "seed",
    "training_comment",
)


def save_lora_file(config, name, unet, text_encoder, info, items, datasets, step, epoch, started_at, accelerator, hooks,
          optimizer_name: str = "") -> Path:
    """Write the kohya LoRA file with full metadata (main process only)."""
    from nbkit.formats.kohya_lora import LoraTrainingInfo, build_metadata, save_kohya_lora
    from nbkit.networks.lora import export_kohya_state_dict

    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    state = export_kohya_state_dict(unet, text_encoder)  # every adapted model, trained or loaded
    fields = {key: getattr(config, key) for key in _SAME_NAME_FIELDS}
    if config.network_weights:  # continued from a file: describe the weights trained, not the config
        fields.update(_shape_fields(state))
    metadata = build_metadata(LoraTrainingInfo(
        **fields,
        arch=info.arch,
        output_name=name,
        steps=step,
        epoch=epoch,
        num_epochs=config.max_train_epochs,
        optimizer=optimizer_name,
        resolution=datasets[0].resolution,
        batch_size=datasets[0].batch_size,
        num_train_images=sum(i.repeats for i in items if not i.subset.is_reg),
        num_reg_images=sum(i.repeats for i in items if i.subset.is_reg),
        tag_frequency=tag_frequency(items),
        dataset_dirs=dataset_dirs(items),
        sd_model_name=str(config.pretrained_model_name_or_path),
        training_started_at=started_at,
        training_finished_at=time.time(),
    ))
    path = Path(config.output_dir) / f"{name}.safetensors"
    save_kohya_lora(state, path, metadata, save_dtype_for(config.save_precision))
    hooks.on_save(path, step)
    return path


def _shape_fields(state: dict) -> dict:
    """network_dim/alpha and conv_dim/alpha of a kohya state dict (kohya
    ``networks/lora.py::create_network_from_weights`` reads them from the tensors the same way)."""
    from nbkit.formats.kohya_metadata import network_shape

    shape = network_shape({k: tuple(v.shape) for k, v in state.items() if k.endswith(".lora_down.weight")},
                          {k: v.float().item() for k, v in state.items() if k.endswith(".alpha")})
    return {"network_dim": shape.network_dim, "network_alpha": shape.network_alpha,
            "conv_dim": shape.conv_dim, "conv_alpha": shape.conv_alpha}
