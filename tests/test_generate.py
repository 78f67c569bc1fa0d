"""Try it: A1111 prompt tags and the X/Y grid, checked cell by cell against directly generated images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nbkit.demo import make_sample_dataset
from nbkit.generate import Axis, file_label, parse_network_tags, read_grid_info, xy_grid
from nbkit.models.load import load_pipeline
from nbkit.networks.lora import load_kohya_lora
from nbkit.train.config import LoRATrainConfig
from nbkit.train.lora import train_lora
from nbkit.train.run_file import resolve_datasets
from nbkit.train.sample_prompts import load_sample_prompts
from nbkit.train.sampling import generate_samples

PROMPTS = ["sks, a red circle --w 64 --h 64 --s 3 --d 7", "sks, a blue square --w 64 --h 64 --s 3"]
SEED = 11


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    """A 3-epoch LoRA run on the tiny model, saving every epoch (kohya names: name-000001, ..., name)."""
    model_dir, _ = tiny_model_dirs("sd15")
    tmp = tmp_path_factory.mktemp("xy-run")
    config = LoRATrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp / "out"),
                             output_name="xy_lora", resolution=64, network_dim=4, network_alpha=4.0,
                             learning_rate=2e-2, train_batch_size=4, max_train_epochs=3, save_every_n_epochs=1,
                             optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False, seed=0)
    images = make_sample_dataset(tmp / "data" / "1_sks shapes", size=64)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    train_lora(config, resolve_datasets(config, raw, tmp), device="cpu")
    files = sorted((tmp / "out").glob("xy_lora*.safetensors"), key=lambda p: (p.stem == "xy_lora", p.stem))
    return model_dir, files, tmp


def _direct(model_dir, lora, prompt_line, seed):
    """What the cell should hold: a fresh pipeline, the LoRA loaded as diffusers users do, one image."""
    pipe, _ = load_pipeline(str(model_dir))
    if lora is not None:
        load_kohya_lora(lora, pipe.unet, pipe.text_encoder)
    (item,) = load_sample_prompts([prompt_line])
    item = item if item.seed is not None else type(item)(**{**item.__dict__, "seed": seed})
    (_, image, _), = generate_samples(pipe, [item], step=0, epoch=None, output_dir=pipe_dir(), output_name="d",
                                      default_sampler="euler_a", default_size=64)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def pipe_dir():
    import tempfile

    return tempfile.mkdtemp(prefix="nbkit-direct-")


def test_prompt_tags_as_a1111_writes_them():
    text, tags = parse_network_tags("<lora:my_char:0.7> sks girl, <hypernet:anime:0.5> smiling <lora:style>")
    assert text == "sks girl,  smiling" and tags == [("lora", "my_char", 0.7), ("hypernet", "anime", 0.5),
                                                     ("lora", "style", 1.0)]
    with pytest.raises(ValueError, match="not a number"):
        parse_network_tags("<lora:x:strong>")
    assert file_label(__import__("pathlib").Path("run-000003.safetensors")) == "epoch 3"


def test_xy_grid_of_epochs_by_prompts_matches_direct_generation(run, tmp_path):
    model_dir, files, _ = run
    assert [p.stem for p in files] == ["xy_lora-000001", "xy_lora-000002", "xy_lora"]
    pipe, _ = load_pipeline(str(model_dir))
    base_before = generate_samples(pipe, load_sample_prompts(PROMPTS[:1]), step=0, epoch=None, output_dir=tmp_path,
                                   output_name="b", default_sampler="euler_a")[0][1]
    grid = xy_grid(pipe, rows=Axis.files(files), cols=Axis.prompts(PROMPTS), seed=SEED, default_size=64,
                   out=tmp_path / "xy.png")

    with Image.open(tmp_path / "xy.png") as png:  # the saved file, decoded
        x0, y0 = grid.origin
        assert png.size == (x0 + 2 * 64, y0 + 3 * 64) and y0 > 0 and x0 > 0  # room for the axis labels
        saved = np.asarray(png.convert("RGB"), dtype=np.int16)
    info = read_grid_info(tmp_path / "xy.png")
    assert info["row_labels"] == ["epoch 1", "epoch 2", "xy_lora"]
    assert info["col_labels"] == ["sks, a red circle", "sks, a blue square"]
    assert info["seeds"] == [[7, SEED]] * 3  # the prompt's --d, else the grid's seed, the same down a column
    for r, lora in enumerate(files):
        for c, line in enumerate(PROMPTS):
            x1, y1, x2, y2 = grid.cell_box(r, c)
            expected = _direct(model_dir, lora, line, SEED)
            assert np.abs(saved[y1:y2, x1:x2] - expected).max() <= 1, (r, c)
    assert np.abs(saved[grid.cell_box(0, 0)[1]:grid.cell_box(0, 0)[3], x0:x0 + 64]
                  - saved[grid.cell_box(2, 0)[1]:grid.cell_box(2, 0)[3], x0:x0 + 64]).max() > 8, "epochs look alike"
    base_after = generate_samples(pipe, load_sample_prompts(PROMPTS[:1]), step=0, epoch=None, output_dir=tmp_path,
                                  output_name="a", default_sampler="euler_a")[0][1]
    assert np.array_equal(np.asarray(base_before), np.asarray(base_after)), "the LoRA stayed on the pipeline"


def test_strengths_axis_and_lora_tags(run, tmp_path):
    model_dir, files, folder = run
    final = files[-1]
    pipe, _ = load_pipeline(str(model_dir))
    grid = xy_grid(pipe, rows=Axis.strengths([0.0, 1.0]), cols=Axis.prompts(PROMPTS[:1]), network=final,
                   default_size=64, seed=SEED)
    zero, one = (np.asarray(row[0].convert("RGB"), dtype=np.int16) for row in grid.cells)
    assert np.abs(zero - _direct(model_dir, None, PROMPTS[0], SEED)).max() <= 1  # strength 0 is the base model
    assert np.abs(one - _direct(model_dir, final, PROMPTS[0], SEED)).max() <= 1
    assert grid.row_labels == ["strength 0", "strength 1"]

    tagged = xy_grid(pipe, rows=Axis.prompts(["<lora:xy_lora:1> " + PROMPTS[0]]), cols=Axis.strengths([1.0]),
                     network=files[0], network_dirs=[folder / "out"], default_size=64, seed=SEED)
    assert tagged.col_labels == ["strength 1"] and tagged.row_labels == ["<lora:xy_lora:1> sks, a red circle"]
    both = np.asarray(tagged.cells[0][0].convert("RGB"), dtype=np.int16)
    assert np.abs(both - one).max() > 0, "the tag's LoRA and the axis file must both apply"
    with pytest.raises(FileNotFoundError, match="no_such"):
        xy_grid(pipe, rows=Axis.prompts(["<lora:no_such:1> x --w 64 --h 64 --s 2"]), cols=Axis.strengths([1.0]),
                network=final, network_dirs=[folder / "out"])


def test_embeddings_load_by_file_name_as_a1111_does(tmp_path):
    """`nbkit generate --embeddings`: a file's stem becomes its prompt word (A1111's embeddings folder);
    every vector of a multi-vector embedding lands in the text encoder's rows of its tokens, and the
    word in a prompt expands to all of them."""
    import torch

    from nbkit.formats.embeddings import save_safetensors_embedding
    from nbkit.generate import load_embeddings
    from nbkit.models.load import load_pipeline
    from nbkit.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", arch="sd15", seed=0)["diffusers"]
    pipe, _ = load_pipeline(str(model))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    rows = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    path = save_safetensors_embedding({"text_encoder": rows}, tmp_path / "shinystyle.safetensors")
    assert load_embeddings(pipe, [path]) == ["shinystyle"]
    ids = pipe.tokenizer.convert_tokens_to_ids(["shinystyle", "shinystyle_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), rows)
    prompt = pipe.maybe_convert_prompt("a photo of shinystyle", pipe.tokenizer)
    assert prompt.split()[-2:] == ["shinystyle", "shinystyle_1"]
