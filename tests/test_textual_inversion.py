"""Textual inversion (issue 19): embeddings trained by the one loop on the tiny SD1 and SDXL models, read
back by diffusers' ``load_textual_inversion`` to the same text-encoder output, A1111's pickle gate on the
``.pt``, only the new rows trained, exact resume after kill -9, and clear errors for bad options
(CPU, nothing downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from kill_harness import run_killable
from safetensors import safe_open
from safetensors.torch import load_file

from nbkit.config import ConfigError
from nbkit.demo import make_sample_dataset

TOKEN = "zqtok"
ATOL = 1e-6
BUCKETS = {"enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 64}
pytestmark = pytest.mark.filterwarnings("ignore:mixed_precision=fp16 needs a GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("ti-data") / "img", size=64)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    from nbkit.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ti-sdxl") / "tiny-sdxl", arch="sdxl", seed=0)["diffusers"]


def _config(model_dir, out: Path, **options):
    from nbkit.train.textual_inversion_config import TextualInversionTrainConfig

    base = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), token_string=TOKEN,
                resolution=64, max_train_steps=3, mixed_precision="no", gradient_checkpointing=False, seed=1,
                learning_rate=2e-2)  # fmt: skip
    return TextualInversionTrainConfig(**{**base, **options})


def _datasets(config, images: Path, sdxl: bool = False, **subset):
    from nbkit.train.run_file import resolve_datasets

    raw = {"datasets": [{**(BUCKETS if sdxl else {}), "subsets": [
        {"image_dir": str(images), "caption_extension": ".txt", **subset}]}]}
    return resolve_datasets(config, raw, images.parent)


def _train(model_dir, images: Path, out: Path, sdxl: bool = False, subset: dict | None = None, **options):
    from nbkit.train.textual_inversion import train_textual_inversion

    config = _config(model_dir, out, **options)
    return train_textual_inversion(config, _datasets(config, images, sdxl, **(subset or {})), device="cpu")


def _fresh(model_dir, sdxl: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(str(model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def trained_sd1(tiny_model_dirs, images, tmp_path_factory):
    """Two vectors from a two-token init word, the token put in every caption by caption_prefix, AdamW
    with a large weight decay (kohya's restore-the-rows trick is needed exactly because of it), gradient
    checkpointing, previews with the token (before training and every 2 steps), a step save."""
    out = tmp_path_factory.mktemp("ti-sd1")
    prompts = out / "prompts.txt"
    prompts.write_text(f"{TOKEN}, a red circle --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    result = _train(tiny_model_dirs("sd15")[0], images, out, subset={"caption_prefix": TOKEN},
                    init_word="red circle", num_vectors_per_token=2, optimizer_type="AdamW",
                    optimizer_args=["weight_decay=0.5"], gradient_checkpointing=True, sample_prompts=str(prompts),
                    sample_every_n_steps=2, sample_at_first=True, save_every_n_steps=2)
    return result, out


@pytest.fixture(scope="module")
def trained_sdxl(sdxl_dir, images, tmp_path_factory):
    """Both text encoders (clip_l + clip_g rows), kohya's object templates, a non-square bucket."""
    out = tmp_path_factory.mktemp("ti-sdxl-out")
    return _train(sdxl_dir, images, out, sdxl=True, init_word="red", num_vectors_per_token=2,
                  use_object_template=True, resolution=128)


def _rows(pipe, which: str, words: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer if which == "text_encoder" else pipe.tokenizer_2
    ids = tokenizer.encode(words, add_special_tokens=False)
    return getattr(pipe, which).get_input_embeddings().weight[ids].detach()


@torch.no_grad()
def _encode(pipe, which: str, prompt: str) -> tuple[list[int], list[torch.Tensor]]:
    """The prompt as the pipeline encodes it (its textual-inversion expansion first): ids, penultimate and
    last hidden states (and the projected pooled output of SDXL's second encoder)."""
    tokenizer = pipe.tokenizer if which == "text_encoder" else pipe.tokenizer_2
    text = pipe.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = getattr(pipe, which)(ids, output_hidden_states=True)
    tensors = [out.hidden_states[-2], out.last_hidden_state]
    if which == "text_encoder_2":
        tensors.append(out.text_embeds)
    return ids[0].tolist(), tensors


# ----------------------------------------------------------------------------- the files in diffusers


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_loads_the_embedding_to_the_same_text_encoder_output(arch, request, tiny_model_dirs, sdxl_dir):
    """The saved file, loaded by diffusers into a fresh base with the token, encodes a prompt with the
    token exactly as nbkit's in-memory model does; the vectors moved away from the init word's."""
    sdxl = arch == "sdxl"
    result = request.getfixturevalue("trained_sdxl") if sdxl else request.getfixturevalue("trained_sd1")[0]
    model_dir = sdxl_dir if sdxl else tiny_model_dirs("sd15")[0]
    ours, theirs, base = result.pipeline, _fresh(model_dir, sdxl), _fresh(model_dir, sdxl)
    if sdxl:
        saved = load_file(str(result.embedding_path))
        theirs.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder,
                                      tokenizer=theirs.tokenizer)
        theirs.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=theirs.text_encoder_2,
                                      tokenizer=theirs.tokenizer_2)
    else:
        theirs.load_textual_inversion(str(result.embedding_path), token=TOKEN)
    prompt = f"a photo of {TOKEN}, blue background"
    for which in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
        tokenizer = ours.tokenizer if which == "text_encoder" else ours.tokenizer_2
        new_ids = tokenizer.convert_tokens_to_ids(result.tokens)
        ids, mine = _encode(ours, which, prompt)
        their_ids, loaded = _encode(theirs, which, prompt)
        # the one word stands for both vectors, in order, in nbkit's tokenizer and in diffusers'
        assert result.tokens == [TOKEN, f"{TOKEN}_1"]
        assert ids[ids.index(new_ids[0]):ids.index(new_ids[0]) + 2] == new_ids and their_ids == ids
        diff = max((a - b).abs().max().item() for a, b in zip(mine, loaded, strict=True))
        print(f"\n{arch} {which}: max abs diff nbkit vs diffusers-loaded = {diff:.3g}")
        assert diff < ATOL, which
        init = _rows(base, which, "red circle" if not sdxl else "red")
        init = init[[0, 1 % len(init)]]  # kohya's rule: vector i = init token i mod the count
        trained = getattr(ours, which).get_input_embeddings().weight[new_ids].detach()
        moved = (trained - init).abs().max().item()
        print(f"{arch} {which}: max abs change of the vectors from the init word's = {moved:.3g}")
        assert moved > 1e-3, which


def test_sd2_embedding_loads_in_diffusers(tiny_model_dirs, images, tmp_path):
    """SD2 (OpenCLIP-style text encoder, '!' padding): one vector, no init word (zeros, A1111's start)."""
    model_dir = tiny_model_dirs("sd21")[0]
    result = _train(model_dir, images, tmp_path, subset={"caption_prefix": TOKEN}, max_train_steps=2)
    saved = load_file(str(result.embedding_path))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"emb_params": (1, 64)}
    assert saved["emb_params"].abs().max() > 0  # moved away from zero
    theirs = _fresh(model_dir)
    theirs.load_textual_inversion(str(result.embedding_path), token=TOKEN)
    ids, mine = _encode(result.pipeline, "text_encoder", f"a photo of {TOKEN}")
    their_ids, loaded = _encode(theirs, "text_encoder", f"a photo of {TOKEN}")
    assert ids == their_ids and result.pipeline.tokenizer.convert_tokens_to_ids(TOKEN) in ids
    diff = max((a - b).abs().max().item() for a, b in zip(mine, loaded, strict=True))
    print(f"\nsd2 text_encoder: max abs diff nbkit vs diffusers-loaded = {diff:.3g}")
    assert diff < ATOL


def test_only_the_new_rows_trained(trained_sd1, trained_sdxl, tiny_model_dirs, sdxl_dir):
    """Every other token row (and every other weight of the text encoders and the U-Net) is bit-identical
    to the base after training with a large AdamW weight decay."""
    for result, model_dir, sdxl in ((trained_sd1[0], tiny_model_dirs("sd15")[0], False),
                                    (trained_sdxl, sdxl_dir, True)):
        ours, base = result.pipeline, _fresh(model_dir, sdxl)
        for which in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
            mine, theirs = getattr(ours, which).state_dict(), getattr(base, which).state_dict()
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                if key.endswith("token_embedding.weight"):
                    assert mine[key].shape[0] == value.shape[0] + 2  # two new rows, appended
                    assert torch.equal(mine[key][: value.shape[0]], value), which
                else:
                    assert torch.equal(mine[key], value), (which, key)
        unet = base.unet.state_dict()
        assert all(torch.equal(v, unet[k]) for k, v in ours.unet.state_dict().items())


def test_safetensors_hold_only_the_expected_keys_and_shapes(trained_sd1, trained_sdxl):
    result, out = trained_sd1
    sd1 = load_file(str(result.embedding_path))
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd1.items()} == {"emb_params": ((2, 32), torch.float32)}
    assert result.embedding_path == out / f"{TOKEN}.safetensors"  # output_name defaults to token_string
    step = load_file(str(out / f"{TOKEN}-step00000002.safetensors"))
    assert step.keys() == sd1.keys() and not torch.equal(step["emb_params"], sd1["emb_params"])
    with safe_open(str(result.embedding_path), "pt") as fh:
        assert fh.metadata()["name"] == TOKEN and fh.metadata()["step"] == "3"
    xl = load_file(str(trained_sdxl.embedding_path))
    assert {k: tuple(v.shape) for k, v in xl.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}


def test_previews_show_the_token(trained_sd1):
    """Previews before training and every 2 steps, the token in the prompt expanded by the in-memory
    pipeline (both tokens are in its tokenizer)."""
    result, out = trained_sd1
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert [n.split("_")[1] for n in names] == ["000000", "000002"]
    assert result.pipeline.maybe_convert_prompt(f"{TOKEN}, x", result.pipeline.tokenizer) == \
        f"{TOKEN} {TOKEN}_1, x"


# ----------------------------------------------------------------------------- A1111 .pt


def test_pt_passes_a1111_gate_and_continues_training(tiny_model_dirs, images, trained_sd1, tmp_path):
    """save_as = pt: legacy serialization through A1111's restricted unpickler, the fields its loader and
    diffusers read; the .pt then continues training (weights) from exactly its vectors."""
    from test_hypernetwork_format import a1111_check_pt

    from nbkit.formats.embeddings import a1111_pt_dict, load_embedding_file

    model_dir = tiny_model_dirs("sd15")[0]
    result = _train(model_dir, images, tmp_path / "pt", subset={"caption_prefix": TOKEN}, save_as="pt",
                    save_precision="fp16", max_train_steps=2, output_name="mychar")
    path = tmp_path / "pt" / "mychar.pt"
    assert result.embedding_path == path
    a1111_check_pt(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and list(data["string_to_param"]) == ["*"]
    assert data["string_to_param"]["*"].shape == (1, 32) and data["string_to_param"]["*"].dtype == torch.float16
    assert data["name"] == TOKEN and data["step"] == 2 and data["sd_checkpoint_name"] == Path(model_dir).name
    assert data["string_to_param"]["*"].abs().max() > 0  # trained from zeros (no init_word: A1111's start)
    diffusers_pipe = _fresh(model_dir)
    diffusers_pipe.load_textual_inversion(str(path))  # A1111 branch: the token is the stored name
    assert TOKEN in diffusers_pipe.tokenizer.get_vocab()
    # SDXL .pt: exactly clip_l + clip_g (A1111 converts every value of that dict), through the gate too
    xl = {"text_encoder": torch.randn(2, 32), "text_encoder_2": torch.randn(2, 64)}
    assert set(a1111_pt_dict(xl, TOKEN, 5)) == {"clip_l", "clip_g"}
    # continue: one step at a negligible rate starts from the file's vectors, not the init word's
    start = load_embedding_file(path)[0]["text_encoder"].float()
    again = _train(model_dir, images, tmp_path / "again", subset={"caption_prefix": TOKEN}, weights=str(path),
                   init_word="red", max_train_steps=1, learning_rate=1e-9)
    rows = load_file(str(again.embedding_path))["emb_params"]
    assert (rows - start).abs().max().item() < 1e-6


def test_embedding_format_round_trips(tmp_path):
    from test_hypernetwork_format import a1111_check_pt

    from nbkit.formats.embeddings import (
        EmbeddingFormatError,
        from_file_dict,
        load_embedding_file,
        save_a1111_embedding,
        save_safetensors_embedding,
    )

    sd = {"text_encoder": torch.randn(3, 8)}
    xl = {"text_encoder": torch.randn(2, 8), "text_encoder_2": torch.randn(2, 16)}
    for name, emb in (("sd", sd), ("xl", xl)):
        save_safetensors_embedding(emb, tmp_path / f"{name}.safetensors")
        save_a1111_embedding(emb, tmp_path / f"{name}.pt", name, 7, dtype=torch.bfloat16)  # bf16: stored fp32
        a1111_check_pt(tmp_path / f"{name}.pt")
        for suffix, atol in (("safetensors", 0), ("pt", 1e-2)):
            back, _ = load_embedding_file(tmp_path / f"{name}.{suffix}")
            assert back.keys() == emb.keys()
            assert all((back[k] - emb[k]).abs().max() <= atol for k in emb)
    assert torch.load(tmp_path / "xl.pt", weights_only=True)["clip_g"].dtype == torch.float32
    assert from_file_dict({"<tok>": torch.ones(8)})["text_encoder"].shape == (1, 8)  # diffusers learned_embeds
    with pytest.raises(EmbeddingFormatError, match="clip_g"):
        from_file_dict({"clip_l": torch.ones(1, 8)})
    with pytest.raises(EmbeddingFormatError, match="not an embedding"):
        from_file_dict({"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(EmbeddingFormatError, match="same number of rows"):
        from_file_dict({"clip_l": torch.ones(1, 8), "clip_g": torch.ones(2, 16)})


# ----------------------------------------------------------------------------- resume


CHILD = """
from pathlib import Path
from nbkit.train.run_file import resolve_datasets
from nbkit.train.textual_inversion import train_textual_inversion
from nbkit.train.textual_inversion_config import TextualInversionTrainConfig

config, datasets_raw, base = PAYLOAD
cfg = TextualInversionTrainConfig(**config)
train_textual_inversion(cfg, resolve_datasets(cfg, datasets_raw, Path(base)), device="cpu")
"""


def test_kill_and_resume_gives_the_same_embedding(tiny_model_dirs, images, tmp_path):
    """kill -9 mid-step and during a state save; the resumed run ends with the reference's vectors."""
    model_dir = tiny_model_dirs("sd15")[0]
    raw = {"datasets": [{"batch_size": 2, "subsets": [
        {"image_dir": str(images), "caption_extension": ".txt", "caption_prefix": TOKEN, "shuffle_caption": True,
         "flip_aug": True}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, token_string=TOKEN, init_word="red",
                num_vectors_per_token=2, train_batch_size=2, max_train_steps=7, optimizer_type="AdamW",
                learning_rate=2e-2, lr_scheduler="linear", mixed_precision="no", gradient_checkpointing=False,
                seed=7, save_state_every_n_steps=2)  # fmt: skip

    def run(folder: str, kill: str = "", **extra) -> int:
        return run_killable(CHILD, [dict(base, output_dir=str(tmp_path / folder), **extra), raw, str(tmp_path)], kill)

    assert run("reference") == 0
    # 1: mid-step at step 3 (the step-2 state exists); 2: during the step-4 state save of the resumed run
    # (its second torch.save: optimizer.pt, then scheduler.pt), so the newest complete state stays step 2
    assert run("resumed", "step:3", resume="auto") == -9
    assert run("resumed", "save:2", resume="auto") == -9
    # resumed from step 2, the last run needs 5 updates: a fresh start would be killed at its 6th
    assert run("resumed", "step:6", resume="auto") == 0
    ours = load_file(str(tmp_path / "resumed" / f"{TOKEN}.safetensors"))["emb_params"]
    theirs = load_file(str(tmp_path / "reference" / f"{TOKEN}.safetensors"))["emb_params"]
    diff = (ours - theirs).abs().max().item()
    print(f"\nresumed vs uninterrupted embedding: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    state = load_file(str(sorted((tmp_path / "resumed").glob(f"{TOKEN}-step*-state"))[-1] / "trainable.safetensors"))
    assert set(state) == {"text_encoder.token_rows"} and state["text_encoder.token_rows"].shape == (2, 32)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(("options", "match"), [
    ({"token_string": None}, "token_string = None: set the word"),
    ({"token_string": "my char"}, "without spaces"),
    ({"num_vectors_per_token": 0}, "num_vectors_per_token = 0: must be at least 1"),
    ({"num_vectors_per_token": 80}, "at most 75"),
    ({"use_object_template": True, "use_style_template": True}, "both set"),
    ({"use_style_template": True, "template_file": "style.txt"}, "both set"),
    ({"cache_text_encoder_outputs": True}, "cache_text_encoder_outputs = true|cache_text_encoder_outputs = True"),
    ({"weights": "/no/such/embedding.safetensors"}, "weights = .*no such file"),
    ({"learning_rate": -1.0}, "learning rate must be positive"),
    ({"template_file": "no_such_template"}, "not one of the shipped templates"),
    ({"weights": "THREE"}, "3 vectors, num_vectors_per_token = 2"),
])
def test_bad_options_fail_before_any_model_loads(options, match, tmp_path):
    """A ConfigError naming the option, before the (missing) base model would load."""
    from nbkit.formats.embeddings import save_safetensors_embedding
    from nbkit.train.textual_inversion import train_textual_inversion

    if options.get("weights") == "THREE":
        options = {**options, "weights": str(save_safetensors_embedding({"text_encoder": torch.zeros(3, 32)},
                                                                         tmp_path / "three.safetensors"))}
    with pytest.raises(ConfigError, match=match):
        config = _config(tmp_path / "no-model-here", tmp_path / "out", **{"num_vectors_per_token": 2, **options})
        train_textual_inversion(config, [], device="cpu")


def test_init_word_rule_and_taken_tokens():
    """kohya's rule: more init tokens than vectors is fine (truncated, with a note), fewer repeat; a
    token the tokenizer already has is refused."""
    from nbkit.models.tiny import build_tiny_pipeline
    from nbkit.train.textual_inversion import add_tokens, token_names

    pipe = build_tiny_pipeline("sd15")
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    red, circle = pipe.tokenizer.encode("red circle", add_special_tokens=False)
    with pytest.warns(UserWarning, match="2 tokens for 1 vectors"):
        _, rows = add_tokens(pipe.tokenizer, pipe.text_encoder, token_names("onevec", 1), "red circle", "te")
    assert torch.equal(rows, weight[[red]])
    with pytest.warns(UserWarning, match="2 tokens for 3 vectors"):
        ids, rows = add_tokens(pipe.tokenizer, pipe.text_encoder, token_names("threevec", 3), "red circle", "te")
    assert torch.equal(rows, weight[[red, circle, red]])
    assert ids == list(range(ids[0], ids[0] + 3)) and pipe.text_encoder.get_input_embeddings().weight.shape[0] > ids[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one init token for any vector count: no note
        _, rows = add_tokens(pipe.tokenizer, pipe.text_encoder, token_names("twovec", 2), "red", "te")
    assert torch.equal(rows, weight[[red, red]])
    with pytest.raises(ConfigError, match="'threevec' is already in the te tokenizer"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, token_names("threevec", 1), None, "te")


def test_training_prompts(tiny_model_dirs, images, tmp_path):
    """Captions get the token expanded (kohya's replacement); A1111 templates fill [name] with the tokens
    and [filewords] with the caption; object templates ignore the caption; no caption with the token is
    an error that says how to fix it."""
    import random

    from nbkit.data.captions import CaptionState
    from nbkit.data.train_data import collect_items
    from nbkit.train.hypernetwork_data import load_template
    from nbkit.train.textual_inversion import OBJECT_TEMPLATES, TrainingPrompts

    config = _config(tiny_model_dirs("sd15")[0], tmp_path, num_vectors_per_token=2)
    items, _ = collect_items(_datasets(config, images, caption_prefix=TOKEN))
    batch, rng, state = [(0, False), (1, False)], random.Random(0), CaptionState()
    words = f"{TOKEN} {TOKEN}_1"
    captions = TrainingPrompts(config, [TOKEN, f"{TOKEN}_1"], items, [], rng).batch(items, batch, rng, state)
    assert captions == [f"{words} {items[i].caption}" for i, _ in batch]
    a1111 = TrainingPrompts(config, [TOKEN, f"{TOKEN}_1"], items, load_template("subject_filewords.txt"), rng)
    for prompt, (i, _) in zip(a1111.batch(items, batch, rng, state), batch, strict=True):
        assert words in prompt and items[i].caption.split(",")[1].strip() in prompt and "[" not in prompt
    from dataclasses import replace

    objects = TrainingPrompts(replace(config, use_object_template=True), [TOKEN, f"{TOKEN}_1"], items, [], rng)
    allowed = {t.format(words) for t in OBJECT_TEMPLATES}
    assert all(p in allowed for p in objects.batch(items, batch, rng, state))  # the captions are ignored
    plain, _ = collect_items(_datasets(config, images))
    with pytest.raises(ConfigError, match="is in no caption.*caption_prefix"):
        TrainingPrompts(config, [TOKEN, f"{TOKEN}_1"], plain, [], rng).check(plain)


# ----------------------------------------------------------------------------- command line


def test_cli_trains_from_a_run_toml(tiny_model_dirs, images, tmp_path, capsys):
    from nbkit.cli import build_parser, main

    args = build_parser().parse_args(["train", "textual_inversion", "--token_string", "abc",
                                      "--num-vectors-per-token", "3", "--save_as", "pt", "--use_style_template"])
    assert (args.token_string, args.num_vectors_per_token, args.save_as, args.use_style_template) == ("abc", 3, "pt",
                                                                                                        True)
    run = tmp_path / "ti.toml"
    run.write_text(f"""
pretrained_model_name_or_path = "{tiny_model_dirs('sd15')[0]}"
output_dir = "{tmp_path / 'out'}"
token_string = "{TOKEN}"
init_word = "red"
resolution = 64
max_train_steps = 2
mixed_precision = "no"
gradient_checkpointing = false

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{images}"
  caption_extension = ".txt"
  caption_prefix = "{TOKEN}"
""", encoding="utf-8")
    assert main(["train", "textual_inversion", "--config", str(run), "--save_as", "pt", "--threads", "1"]) == 0
    assert f"{TOKEN}.pt" in capsys.readouterr().out
    assert torch.load(tmp_path / "out" / f"{TOKEN}.pt", weights_only=True)["step"] == 2
    assert main(["train", "textual_inversion", "--config", str(run), "--token_string", "", "--threads", "1"]) == 2
    assert "token_string" in capsys.readouterr().err
