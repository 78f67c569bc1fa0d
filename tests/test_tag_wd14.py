"""WD14 tagger: kohya's preprocessing, tag selection rules, a tiny ONNX tagger end to end, Hub cache."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from nbkit.tag.backup import list_backups, undo
from nbkit.tag.config import WD14Config
from nbkit.tag.files import CaptionError
from nbkit.tag.tiny import SIZE, TAGS, write_model
from nbkit.tag.wd14 import WD14Tagger, tag_images, tagger_files
from nbkit.tag.wd14_image import area_resize, load_tagger_image
from nbkit.tag.wd14_labels import (
    TagLabels,
    TagRules,
    parse_tag_replacement,
    read_selected_tags,
    rename_labels,
    select_tags,
)


@pytest.fixture(scope="module")
def model_v2(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("wd-v1-4-tiny-v2"))


@pytest.fixture(scope="module")
def model_v3_fixed(tmp_path_factory):
    """v3 models name their tensors input/output; this one also has a fixed batch of 2."""
    return write_model(tmp_path_factory.mktemp("wd-tiny-v3"), "input", "output", fixed_batch=2)


def labels() -> TagLabels:
    names = tuple(t[0] for t in TAGS)
    return TagLabels(names, names, tuple(t[1] for t in TAGS))


def probs(**override) -> np.ndarray:
    p = np.array([t[2] for t in TAGS], dtype=np.float64)
    for name, value in override.items():
        p[[t[0] for t in TAGS].index(name)] = value
    return p


def dataset(folder, colours=("white", "black")):
    """Square images (no white padding), so white_background follows the colour alone."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in colours:
        Image.new("RGB", (32, 32), name).save(folder / f"{name}.png")
    return folder


# ---------------------------------------------------------------- preprocessing
def composite_binary_alpha(rgba: np.ndarray) -> np.ndarray:
    """Independent alpha-onto-white for alpha in {0, 255}."""
    return np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)


def test_preprocess_non_square_rgba_exact(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (16, 48, 4), dtype=np.uint8)  # h=16, w=48: padded to 48, shrunk 3x to 16
    rgba[..., 3] = np.where(rng.random((16, 48)) < 0.3, 0, 255)  # transparent pixels hide non-white colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    got = load_tagger_image(tmp_path / "t.png", SIZE)

    rgb = composite_binary_alpha(rgba)
    square = np.full((48, 48, 3), 255, np.uint8)
    square[16:32] = rgb  # (48 - 16) // 2 = 16 rows of white above, 16 below
    blocks = square.reshape(16, 3, 16, 3, 3).astype(np.float64).mean(axis=(1, 3))
    expected = np.floor(blocks + 0.5)[:, :, ::-1].astype(np.float32)  # INTER_AREA = block mean; then BGR
    assert got.dtype == np.float32 and got.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, expected)


def test_preprocess_odd_padding_and_enlarging_is_pil_lanczos(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "small.png")
    got = load_tagger_image(tmp_path / "small.png", SIZE)
    square = np.full((7, 7, 3), 255, np.uint8)
    square[1:5] = rgb  # pad 3 rows: 1 above (3 // 2), 2 below, as kohya's np.pad
    expected = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(got, expected[:, :, ::-1].astype(np.float32))


def overlap_weights(n: int, size: int) -> np.ndarray:
    """Brute-force area weights: the covered fraction of each source pixel for each output pixel."""
    w, scale = np.zeros((size, n)), n / size
    for j in range(size):
        for i in range(n):
            w[j, i] = max(0.0, min((j + 1) * scale, i + 1) - max(j * scale, i))
    return w / scale


def test_area_resize_matches_area_definition_and_box_does_not():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)
    w = overlap_weights(25, 10)  # factor 2.5: fractional pixels at every other border
    reference = np.einsum("ai,ijc,bj->abc", w, image.astype(np.float64), w)
    ours = area_resize(image, 10).astype(np.float64)
    assert np.abs(ours - reference).max() <= 0.5 + 1e-9  # correctly rounded area mean (cv2: within 1 level)
    box = np.asarray(Image.fromarray(image).resize((10, 10), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(box - reference).max() > 5  # Pillow BOX weighs whole pixels: not INTER_AREA here
    even = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)  # integer factor: BOX is the block mean too
    box2 = np.asarray(Image.fromarray(even).resize((10, 10), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(box2 - area_resize(even, 10).astype(np.int16)).max() <= 1


# ---------------------------------------------------------------- selection rules (pure)
def test_thresholds_per_category_and_confidence_order():
    rules = TagRules(general_threshold=0.45, character_threshold=0.6)
    assert select_tags(probs(), labels(), rules) == [
        "1girl", "hatsune_miku", "solo", "^_^", "long_hair", "white_background", "star_(symbol)"
    ]
    exact = select_tags(probs(blue_eyes=0.45), labels(), rules)
    assert "blue_eyes" in exact  # >= as kohya
    low = select_tags(probs(), labels(), TagRules(general_threshold=0.35, character_threshold=0.35))
    assert "blue_eyes" in low and "red_eyes" not in low and "megurine_luka" not in low


def test_alphabetical_model_order_and_characters_first():
    rules = TagRules(general_threshold=0.55, character_threshold=0.45)
    assert select_tags(probs(), labels(), replace(rules, order="alphabetical")) == [
        "1girl", "^_^", "hatsune_miku", "kagamine_rin_(vocaloid)", "solo"
    ]
    assert select_tags(probs(), labels(), replace(rules, order="model")) == [
        "1girl", "solo", "^_^", "hatsune_miku", "kagamine_rin_(vocaloid)"
    ]
    first = replace(rules, character_tags_first=True)
    assert select_tags(probs(), labels(), first) == ["hatsune_miku", "kagamine_rin_(vocaloid)", "1girl", "solo", "^_^"]


def test_remove_underscore_keeps_short_tags_and_escape_brackets():
    renamed = rename_labels(labels(), remove_underscore=True)
    rules = TagRules(general_threshold=0.44, character_threshold=0.95, escape_brackets=True, order="model")
    assert select_tags(probs(), renamed, rules) == ["1girl", "solo", "long hair", "^_^", "star \\(symbol\\)",
                                                    "white background"]
    assert select_tags(probs(), labels(), TagRules(general_threshold=0.44, character_threshold=0.95,
                                                   order="model"))[4] == "star_(symbol)"
    assert rename_labels(labels(), remove_underscore=True).names[7] == "^_^"


def test_undesired_tags_by_either_name_and_escaped_input():
    renamed = rename_labels(labels(), remove_underscore=True)
    rules = TagRules(general_threshold=0.44, character_threshold=0.95, order="model",
                     undesired=frozenset(TagRules.user_tags("long_hair, star_\\(symbol\\), solo")))
    assert select_tags(probs(), renamed, rules) == ["1girl", "^_^", "white background"]


def test_rating_placement_and_always_first():
    base = {"general_threshold": 0.55, "character_threshold": 0.95, "order": "model"}
    assert select_tags(probs(), labels(), TagRules(**base, rating="first")) == ["sensitive", "1girl", "solo", "^_^"]
    assert select_tags(probs(), labels(), TagRules(**base, rating="last")) == ["1girl", "solo", "^_^", "sensitive"]
    assert select_tags(probs(), labels(), TagRules(**base, rating="off")) == ["1girl", "solo", "^_^"]
    explicit = probs(explicit=0.9)
    assert select_tags(explicit, labels(), TagRules(**base, rating="first"))[0] == "explicit"  # argmax
    no_rating = TagRules(**base, rating="first", undesired=frozenset({"sensitive"}))
    assert select_tags(probs(), labels(), no_rating) == ["1girl", "solo", "^_^"]
    always = TagRules(**base, rating="first", always_first=TagRules.user_tags("solo, 1boy, ^_^"))
    assert select_tags(probs(), labels(), always) == ["solo", "^_^", "sensitive", "1girl"]


def test_config_thresholds_fall_back_to_thresh_and_flags_map_to_rules():
    rules = WD14Config(thresh=0.5, character_threshold=0.7, use_rating_tags_as_last_tag=True).rules()
    assert (rules.general_threshold, rules.character_threshold, rules.rating) == (0.5, 0.7, "last")
    assert WD14Config(use_rating_tags=True, use_rating_tags_as_last_tag=True).rules().rating == "first"
    assert WD14Config(append_tags=True).existing_mode() == "append"


def test_tag_replacement_and_character_expand_like_kohya():
    assert parse_tag_replacement("1girl,girl;a\\,b,c\\;d") == [("1girl", "girl"), ("a,b", "c;d")]
    with pytest.raises(ValueError, match="old,new"):
        parse_tag_replacement("a,b,c")
    renamed = rename_labels(labels(), remove_underscore=True, character_tag_expand=True,
                            tag_replacement="1girl,1woman;long hair,longhair")
    assert renamed.names[4] == "1woman" and renamed.names[6] == "longhair"
    assert renamed.names[14] == "kagamine rin, vocaloid"
    assert renamed.raw_names[14] == "kagamine_rin_(vocaloid)"


# ---------------------------------------------------------------- tiny ONNX model end to end
def test_tag_folder_with_model_dir(model_v2, tmp_path):
    folder = dataset(tmp_path / "img", ("white", "black", "gray"))
    config = WD14Config(model_dir=str(model_v2), thresh=0.4, character_threshold=0.6, batch_size=2,
                        remove_underscore=True, use_rating_tags=True)
    report = tag_images(folder, config, progress=False, verbose=False)
    assert (report.images, report.written, report.failed) == (3, 3, [])
    white = (folder / "white.txt").read_text(encoding="utf-8")
    assert white == "sensitive, white background, 1girl, hatsune miku, solo, ^_^, long hair, star (symbol)\n"
    black = (folder / "black.txt").read_text(encoding="utf-8")
    assert black == "sensitive, 1girl, hatsune miku, solo, ^_^, long hair, star (symbol)\n"
    assert report.counts["1girl"] == 3 and report.counts["white background"] == 2  # white and mid-grey


def test_v3_names_fixed_batch_padding_and_kohya_model_dir_layout(model_v3_fixed, tmp_path):
    kohya_dir = tmp_path / "wd14_tagger_model"
    shutil.copytree(model_v3_fixed, kohya_dir / "SmilingWolf_wd-swinv2-tagger-v3")
    tagger = WD14Tagger.from_config(WD14Config(repo_id="SmilingWolf/wd-swinv2-tagger-v3", model_dir=str(kohya_dir)))
    assert (tagger.input_name, tagger.input_size, tagger.fixed_batch) == ("input", SIZE, 2)
    assert tagger.providers[-1] == "CPUExecutionProvider"
    folder = dataset(tmp_path / "img", ("white", "black", "gray"))  # 3 images: the last batch is padded
    report = tag_images(folder, WD14Config(batch_size=16, thresh=0.92, caption_extension="tags"),
                        tagger=tagger, progress=False, verbose=False)
    assert report.written == 3
    assert (folder / "white.tags").read_text(encoding="utf-8") == "white_background, 1girl\n"
    assert (folder / "gray.tags").read_text(encoding="utf-8") == "1girl\n"


def test_existing_caption_modes_and_undo(model_v2, tmp_path):
    folder = dataset(tmp_path / "img", ("white",))
    caption = folder / "white.txt"
    original = b"sks, 1girl, outdoors"  # no final newline: undo must give these exact bytes back
    config = {"model_dir": str(model_v2), "thresh": 0.75, "character_threshold": 0.95}
    expected = {
        "skip": "sks, 1girl, outdoors",
        "overwrite": "white_background, 1girl, solo\n",
        "append": "sks, 1girl, outdoors, white_background, solo\n",
        "prepend": "white_background, 1girl, solo, sks, outdoors\n",
    }
    for mode, text in expected.items():
        caption.write_bytes(original)
        report = tag_images(folder, WD14Config(**config, existing_captions=mode), progress=False, verbose=False)
        assert caption.read_text(encoding="utf-8") == text, mode
        assert (report.skipped, report.written) == ((1, 0) if mode == "skip" else (0, 1))
        if mode != "skip":
            undo(folder)
            assert caption.read_bytes() == original
    assert list_backups(folder) == []
    nothing_to_do = WD14Config(model_dir=str(tmp_path / "no-model"), existing_captions="skip")
    assert tag_images(folder, nothing_to_do, progress=False, verbose=False).skipped == 1  # no model needed
    caption.unlink()
    tag_images(folder, WD14Config(**config), progress=False, verbose=False)
    assert caption.is_file()
    result = undo(folder)  # a caption the tagger created is removed again
    assert not caption.exists() and result.removed == [caption]


def test_non_utf8_caption_in_append_mode_names_the_file(model_v2, tmp_path):
    folder = dataset(tmp_path / "img", ("white",))
    (folder / "white.txt").write_bytes("café, 1girl".encode("cp1252"))
    with pytest.raises(CaptionError, match=r"white\.txt: not UTF-8.*re-save it as UTF-8"):
        tag_images(folder, WD14Config(model_dir=str(model_v2), existing_captions="append"),
                   progress=False, verbose=False)


def test_unreadable_image_is_reported_and_others_tagged(model_v2, tmp_path):
    folder = dataset(tmp_path / "img", ("white",))
    (folder / "broken.png").write_bytes(b"not a png")
    report = tag_images(folder, WD14Config(model_dir=str(model_v2)), progress=False, verbose=False)
    assert report.written == 1 and [p.name for p, _ in report.failed] == ["broken.png"]
    assert "1 unreadable" in report.summary() and "images/s" in report.summary()


def test_recursive_skips_hidden_folders(model_v2, tmp_path):
    folder = dataset(tmp_path / "img", ("white",))
    dataset(folder / "10_sub", ("black",))
    dataset(folder / ".ipynb_checkpoints", ("gray",))
    flat = tag_images(folder, WD14Config(model_dir=str(model_v2)), progress=False, verbose=False)
    deep = tag_images(folder, WD14Config(model_dir=str(model_v2), recursive=True), progress=False, verbose=False)
    assert (flat.images, deep.images) == (1, 2)
    assert (folder / "10_sub" / "black.txt").is_file() and not (folder / ".ipynb_checkpoints" / "gray.txt").exists()


# ---------------------------------------------------------------- Hub path through a local HF cache (offline)
def fake_hub_cache(cache, repo_id, model_folder, sha="0123456789abcdef0123456789abcdef01234567"):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        shutil.copy(model_folder / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def test_hub_repo_from_local_cache_offline(model_v2, tmp_path):
    repo_id = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
    snapshot = fake_hub_cache(tmp_path / "hf", repo_id, model_v2)
    model, tags = tagger_files(repo_id, cache_dir=tmp_path / "hf")
    assert (model, tags) == (snapshot / "model.onnx", snapshot / "selected_tags.csv")
    assert len(read_selected_tags(tags).names) == len(TAGS)
    folder = dataset(tmp_path / "img", ("black",))
    tag_images(folder, WD14Config(cache_dir=str(tmp_path / "hf"), thresh=0.92), progress=False, verbose=False)
    assert (folder / "black.txt").read_text(encoding="utf-8") == "1girl\n"
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*model_dir"):
        tagger_files("SmilingWolf/wd-vit-tagger-v3", cache_dir=tmp_path / "hf")


def test_cli_wd14_with_dash_and_kohya_flags(model_v2, tmp_path, capsys):
    from nbkit.cli import main

    folder = dataset(tmp_path / "img", ("white",))
    assert main(["tag", "wd14", str(folder), "--model-dir", str(model_v2), "--thresh", "0.92",
                 "--use_rating_tags_as_last_tag", "--onnx", "--caption_extention", ".cap"]) == 0  # kohya spellings
    assert (folder / "white.cap").read_text(encoding="utf-8") == "white_background, 1girl, sensitive\n"
    assert "images/s" in capsys.readouterr().out
    assert main(["tag", "wd14", str(folder), "--model_dir", str(tmp_path / "nothing")]) == 2
    assert "no model.onnx + selected_tags.csv" in capsys.readouterr().err
