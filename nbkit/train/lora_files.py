"""Writing the trained LoRA-family network: kohya file names and full ``ss_*``/``modelspec`` metadata."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

from nbkit.data.train_data import dataset_dirs, tag_frequency
from nbkit.train.common import save_dtype_for
from nbkit.train.optimizers import describe_optimizer


def shared_fields(config) -> list[str]:
    """``LoraTrainingInfo`` fields that are training options of the same name (kohya writes them as
    ``ss_<name>``): derived from the two dataclasses, so a new option of either is not missed."""
    from nbkit.formats.kohya_metadata import LoraTrainingInfo

    options = {f.name for f in fields(config)} - {"network_args"}  # the network says its args (parsed)
    return [f.name for f in fields(LoraTrainingInfo) if f.name in options]


def save_lora_file(run, network, name: str, step: int) -> Path:
    """Write the network's kohya file with full metadata (main process only)."""
    from nbkit.formats.kohya_lora import LoraTrainingInfo, build_metadata, save_kohya_lora

    config, items = run.config, run.items
    state = network.state_dict()  # every adapted model, trained or loaded
    values = {key: getattr(config, key) for key in shared_fields(config)}
    values.update(network.metadata(state))  # the network as trained (a continued file: its ranks)
    values.update(
        arch=run.info.arch,
        output_name=name,
        steps=step,
        epoch=run.progress.epoch,
        num_epochs=config.max_train_epochs,
        optimizer=describe_optimizer(run.optimizer),
        resolution=run.datasets[0].resolution,
        batch_size=run.datasets[0].batch_size,
        num_train_images=sum(i.repeats for i in items if not i.subset.is_reg),
        num_reg_images=sum(i.repeats for i in items if i.subset.is_reg),
        tag_frequency=tag_frequency(items),
        dataset_dirs=dataset_dirs(items),
        sd_model_name=str(config.pretrained_model_name_or_path),
        training_started_at=run.started_at,
        training_finished_at=time.time(),
    )
    path = Path(config.output_dir) / f"{name}.safetensors"
    save_kohya_lora(state, path, build_metadata(LoraTrainingInfo(**values)), save_dtype_for(config.save_precision))
    return path

