"""The pre-flight panel: counts from the trainer's functions, VRAM/time from the estimator, fixes."""

from __future__ import annotations

import dataclasses
import sys
import types
from types import SimpleNamespace

import pytest

from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.demo import make_sample_dataset
from nbkit.presets import apply_preset
from nbkit.train.config import LoRATrainConfig
from nbkit.ui.preflight import NO_GPU, preflight


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "5_sks shapes", size=64)


def _specs(images, reg=None, batch=2):
    subsets = [SubsetSpec(image_dir=images, num_repeats=5, caption_extension=".txt")]
    if reg is not None:
        subsets.append(SubsetSpec(image_dir=reg, num_repeats=1, caption_extension=".txt", is_reg=True))
    return [DatasetSpec(resolution=(64, 64), batch_size=batch, subsets=subsets)]


def _config(**values):
    return LoRATrainConfig(pretrained_model_name_or_path="tiny", resolution=64, train_batch_size=2, **values)


@pytest.fixture()
def fake_estimator(monkeypatch):
    """A stand-in ``nbkit.estimate`` with fixed answers, so the panel's logic is tested exactly."""
    module = types.ModuleType("nbkit.estimate")
    module.peak = 20.0
    module.fit_changes = {"train_batch_size": 1, "gradient_checkpointing": True}
    module.setting_from_config = lambda config, method, arch=None: SimpleNamespace(method=method, config=config)
    module.estimate = lambda setting: SimpleNamespace(peak_gib=module.peak, breakdown={}, setting=setting)
    module.estimate_step_seconds = lambda setting, gpu="T4": 1.5

    def auto_fit(config, method, gpu_gib=15.0, headroom_gib=1.0, arch=None, **options):
        module.fit_options = options
        if module.fit_changes is None:
            raise RuntimeError("cannot fit")
        return dataclasses.replace(config, **module.fit_changes), SimpleNamespace(peak_gib=11.2), module.fit_changes

    module.auto_fit = auto_fit
    monkeypatch.setitem(sys.modules, "nbkit.estimate", module)
    return module


def test_counts_are_the_trainers(images, tmp_path, fake_estimator):
    reg = make_sample_dataset(tmp_path / "reg", size=64)
    fake_estimator.peak = 6.0
    check = preflight(_config(max_train_epochs=3), "lora", _specs(images, reg), gpu="T4")
    # 12 images x 5 repeats, plus 60 regularisation samples (kohya balances reg repeats), batch 2
    assert (check.images, check.reg_images, check.subsets, check.samples_per_epoch) == (12, 12, 2, 120)
    assert (check.steps_per_epoch, check.total_steps, check.epochs) == (60, 180, 3)
    assert check.fits and check.ok and check.peak_gib == 6.0 and check.total_seconds == 270.0
    assert "60 per epoch, 180 in total" in str(check) and "fits" in check._repr_html_()


def test_a_folder_path_counts_like_kohya(images, fake_estimator):
    fake_estimator.peak = 6.0
    check = preflight(_config(max_train_steps=7), "lora", str(images), gpu=15.0)
    assert (check.images, check.samples_per_epoch, check.steps_per_epoch, check.total_steps) == (12, 60, 30, 7)
    assert any("less than one epoch" in w for w in check.warnings)


def test_too_big_shows_the_fix_and_a_fitted_config(images, fake_estimator):
    config = _config(max_train_steps=100, gradient_checkpointing=False)
    check = preflight(config, "lora", _specs(images), gpu="T4")
    assert check.fits is False and not check.ok
    assert "does NOT fit" in check._repr_html_() and any("out of memory" in w for w in check.warnings)
    assert check.fixes[:2] == ["train_batch_size = 1", "gradient_checkpointing = True"]
    assert check.fitted_config == dataclasses.replace(config, train_batch_size=1, gradient_checkpointing=True)
    assert "Suggested changes" in check.widget.value
    # captions that never change let auto-fit cache the text encoder's outputs; shuffled ones do not
    assert check.fixed_captions is True and fake_estimator.fit_options == {"fixed_captions": True}
    shuffled = _specs(images)
    for ds in shuffled:
        ds.subsets = [dataclasses.replace(sub, shuffle_caption=True) for sub in ds.subsets]
    check = preflight(config, "lora", shuffled, gpu="T4")
    assert check.fixed_captions is False and fake_estimator.fit_options == {}


def test_generic_fixes_when_auto_fit_cannot_help(images, fake_estimator):
    fake_estimator.fit_changes = None
    check = preflight(_config(gradient_checkpointing=False, optimizer_type="AdamW"), "lora", _specs(images), gpu="T4")
    text = "\n".join(check.fixes)
    assert "gradient_checkpointing" in text and "AdamW8bit" in text and "train_batch_size = 1" in text
    assert check.fitted_config is None and any("no automatic fix: cannot fit" in w for w in check.warnings)
    skipped = preflight(_config(), "lora", _specs(images), gpu="T4", estimate=False)
    assert skipped.ok and skipped.peak_gib is None and not skipped.notes


def test_without_the_estimator_it_still_counts(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "nbkit.estimate", None)  # import fails, as before it existed
    check = preflight(_config(), "lora", _specs(images), gpu="T4")
    assert check.ok and check.fits is None and check.peak_gib is None and check.steps_per_epoch == 30
    assert any("estimator not available" in n for n in check.notes)


def test_dataset_problems_block(tmp_path, fake_estimator):
    (tmp_path / "empty").mkdir()
    check = preflight(_config(), "lora", _specs(tmp_path / "empty"), gpu="T4")
    assert not check.ok and "no images" in check.errors[0]
    check = preflight(_config(), "lora", None, gpu="T4")  # no dataset_config and no datasets
    assert not check.ok and "no dataset" in check.errors[0]


def test_gpu_detection(images, monkeypatch, fake_estimator):
    import nbkit.colab

    monkeypatch.setattr(nbkit.colab, "gpu_info", lambda device=0: None)
    check = preflight(_config(), "lora", _specs(images))
    assert check.gpu == NO_GPU and check.gpu_gib == 15.0 and any("no GPU" in w for w in check.warnings)
    seen = {}
    fake_estimator.estimate_step_seconds = lambda setting, gpu="T4": seen.setdefault("gpu", gpu) and 2.0
    detected = SimpleNamespace(name="Tesla T4", total_gib=14.74, free_gib=14.6)
    monkeypatch.setattr(nbkit.colab, "gpu_info", lambda device=0: detected)
    check = preflight(_config(mixed_precision="bf16"), "lora", _specs(images))
    assert check.gpu == "Tesla T4 (14.7 GiB)" and check.gpu_gib == 14.74 and seen["gpu"] == "T4"
    assert any("no bf16" in w for w in check.warnings)
    with pytest.raises(ValueError, match="gpu="):
        preflight(_config(), "lora", _specs(images), gpu="H100-imaginary")


def test_the_real_estimator_on_the_t4_preset(images):
    estimate = pytest.importorskip("nbkit.estimate")
    if not hasattr(estimate, "auto_fit"):
        pytest.skip("nbkit.estimate is not complete yet")
    config = apply_preset(LoRATrainConfig(pretrained_model_name_or_path="x"), "T4 LoRA")
    check = preflight(config, "lora", _specs(images), gpu="T4")
    assert check.fits and 2.0 < check.peak_gib < 15.0 and check.step_seconds and check.step_seconds > 0
