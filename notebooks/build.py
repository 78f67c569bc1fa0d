"""Write the notebooks from the text below, so their cells stay consistent.

    python notebooks/build.py           # rewrite notebooks/*.ipynb
    python notebooks/build.py --check   # exit 1 if a notebook differs from what this file writes

Every notebook: a title cell with the "Open in Colab" badge, then pairs of a markdown cell that
teaches and a short code cell that calls nbkit. The first two code cells are the same everywhere:
install nbkit if the runtime lacks it (after a reset), and open the project folder. Notebooks are
written without outputs or execution counts, with cell ids derived from their position.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = "nbkit/nbkit"
PROJECT = "my-lora"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb"
    return (f'<a href="{url}"><img src="https://colab.research.google.com/assets/colab-badge.svg" '
            'alt="Open In Colab"/></a>')


# Where the install cell takes nbkit from. It must name a ref that exists (tests/test_install.py checks
# it against this repository): a branch now, a release tag once releases are published.
SOURCE = f"git+https://github.com/{REPO}@main"

INSTALL_MD = """**Install.** On a fresh Colab runtime (also after a runtime reset) this installs nbkit; when it is already
installed the cell does nothing. `NBKIT_SOURCE` says where nbkit comes from: a git URL with a branch or
release tag after the `@`, a folder on Drive holding a copy of the repository, or a `.whl` file with the
`requirements.txt` of its release beside it. Every library is installed at the exact version the tests ran
with (that `requirements.txt`, applied as constraints), so a library released yesterday cannot break
today's run. Colab's own PyTorch is never reinstalled: nbkit does not pin torch to a CUDA build."""

INSTALL = f"""import importlib.util
import os
import shutil

NBKIT_SOURCE = "{SOURCE}"  # or a Drive folder with the repository, or a .whl
if importlib.util.find_spec("nbkit") is None:  # a fresh runtime: install nbkit with its tested pins
    EXTRA = "tagger-gpu" if shutil.which("nvidia-smi") else "tagger"  # WD14 tagger on the GPU when there is one
    URL, _, REF = NBKIT_SOURCE[4:].rpartition("@") if NBKIT_SOURCE.startswith("git+") else ("", "", "")
    SRC = os.path.expanduser("~/nbkit-src") if URL else NBKIT_SOURCE
    if URL:  # clone that branch or tag: its requirements.txt has the pins it was tested with
        !rm -rf {{SRC}} && git clone -q --depth 1 --branch {{REF}} {{URL}} {{SRC}}
    PINS = os.path.join(SRC if os.path.isdir(SRC) else os.path.dirname(SRC), "requirements.txt")
    %pip install -q "{{SRC}}[{{EXTRA}}]" -c "{{PINS}}\""""

PROJECT_MD = """**Project.** Use the same `PROJECT` name in every notebook: its folder holds all the state (images,
captions, `dataset.toml`, run settings, trained files, resumable states), so this notebook reads what the
earlier ones wrote, never their variables. On Colab, Google Drive is mounted first, so the folder
(`MyDrive/nbkit/<PROJECT>`) survives a runtime reset. With `NBKIT_DEMO=1` set (`%env NBKIT_DEMO=1`) a demo
project opens instead: a tiny model built from code, a drawn sample dataset, runs of a few steps. Anything
earlier steps would have made is made first, so each notebook also runs on its own."""


def project_cell(step: str) -> str:
    return f"""from nbkit.notebook import open_project

PROJECT = "{PROJECT}"  # the same name in every notebook
session = open_project(PROJECT, step="{step}")"""


def common(step: str) -> list[tuple[str, str]]:
    return [(INSTALL_MD, INSTALL), (PROJECT_MD, project_cell(step))]


# ----------------------------------------------------------------------------------------------- 00
SETUP = [
    ("""**0. Demo mode (optional).** `DEMO = True` switches this runtime to the demo: a tiny model built from code,
a drawn sample dataset and runs of a few steps, so every notebook runs on a CPU in minutes and downloads
nothing. It stays on until the runtime restarts. Leave it `False` to train for real.""",
     """import os

DEMO = False  # True: tiny model, sample data, short runs (no GPU needed)
if DEMO:
    os.environ["NBKIT_DEMO"] = "1"
print("demo mode" if os.environ.get("NBKIT_DEMO") == "1" else "real mode: your data, real models")"""),
    ("""**1. Install.** The cell installs nbkit from `NBKIT_SOURCE` only when it is missing; rerunning it is
instant. The source is a git URL with a branch or release tag after the `@` (pin a tag to keep a class on one
version), a folder on Drive holding a copy of the repository (edit nbkit there, reset the runtime, rerun), or
a `.whl` file with its release's `requirements.txt` beside it. That `requirements.txt` lists the exact
library versions the tests passed with, and pip applies it as constraints: a library released after that
release cannot change what you install. Colab's PyTorch stays as it is: nbkit asks for `torch>=2.1` without a
CUDA build, and pip keeps an installed torch that satisfies it (reinstalling torch is what broke most Colab
trainers: xformers and CUDA mismatches after each Colab update). `tagger-gpu` adds onnxruntime-gpu so the
WD14 tagger uses the GPU. To switch to another source in a running session, change `NBKIT_SOURCE`, then
Runtime > Disconnect and delete runtime, and run the cell again.""", INSTALL),
    ("""**2. The runtime.** A free Colab runtime is a T4: 15 GiB of VRAM, fp16 only (no bf16), about 12.7 GB of
system RAM and 2 CPU cores. nbkit's "T4" presets are sized for exactly that: SD1.5 at 512 px, fp16 autocast,
8-bit AdamW, gradient checkpointing, cached latents. The report below names the GPU and its free memory and
warns when there is none (Runtime > Change runtime type > T4 GPU) or when it is not a T4-class card (a
bigger card can take larger batches; a smaller one needs the pre-flight check's fixes in 03). Free VRAM far
below the total means another process holds the GPU. RAM matters as much as VRAM on Colab: loading and
merging checkpoints takes several GB of it.""",
     """from nbkit.runtime import environment_report

env = environment_report()"""),
    ("""**3. Google Drive (recommended).** A Colab VM is deleted when it has been idle too long, and at the latest
after about 12 hours, with everything on its disk. Projects on Drive (`MyDrive/nbkit/<project>`) survive: dataset,
captions, settings, trained files and the states a run resumes from. Mounting asks for permission in a
pop-up the first time. Known Drive problems are handled: files created under `/content/drive` before
mounting are moved aside, a dead mount ("Transport endpoint is not connected") is remounted. Demo mode and
runs outside Colab skip this.""",
     """from nbkit.runtime import connect_drive

USE_DRIVE = True  # False: keep projects on this runtime's disk (lost when the runtime is deleted)
mydrive = connect_drive(USE_DRIVE)"""),
    ("""**4. Hugging Face Hub (optional).** A token is needed only for gated base models and for publishing in
08_export. The best place for it is a Colab secret named `HF_TOKEN` (the key icon in the left bar; allow
notebook access): every notebook finds it, also after a runtime reset, and it never appears in a notebook.
The box below is the alternative: the token is cleared from the box at once, kept only in this runtime's
memory, and never printed or saved. Skip it if you do not need the Hub. Demo mode skips it.""",
     """from nbkit.runtime import hub_login

login = hub_login()  # shows a token box (it says so when HF_TOKEN is already available)
login"""),
    ("""**5. Your project.** Choose a short project name; the notebooks that follow all use it. The summary
says where the folder is and what it already holds, then one line tells whether everything is ready.""",
     f"""from nbkit.notebook import open_project
from nbkit.runtime import ready_line

PROJECT = "{PROJECT}"  # the same name in every notebook
session = open_project(PROJECT, step="setup")
print(ready_line(session))"""),
]

# ----------------------------------------------------------------------------------------------- 01
DATASET = [
    ("""## 1. Import the images
The images are **copied** into the project (`dataset/<name>/`); your originals are only read. A source can
be a folder (e.g. on Drive), a `.zip` on Drive, an https URL of a zip, or a Hugging Face dataset id. Upload a
zip to Drive rather than through the browser: Colab's upload widget fails on files above 1 MB.

Folder names follow kohya: `10_sks dog` means 10 repeats per epoch and the class tokens `sks dog` (the
caption of images without a caption file). The import writes `dataset.toml` (kohya's dataset schema), which
the training notebooks read. Running the cell again keeps the copy as it is, so captions written into it
survive; pass `replace=True` to copy again.

What makes a good set: 15-50 sharp images of the subject in varied poses, framings and backgrounds (a style:
50-200), at least 512 px on the short side. In demo mode the source is a drawn set of 13 shapes, one of them
a re-saved copy on purpose.""",
     """from nbkit.data.importer import import_dataset

SOURCE = "/content/drive/MyDrive/my-images.zip"  # a folder, a .zip, a zip URL or a Hugging Face dataset id
result = import_dataset([session.source(SOURCE)], session.project)
print(result.summary())"""),
    ("""## 2. Check before training
The check reads every image the way the trainer will and lists problems: unreadable or truncated files,
images smaller than the training resolution (they get upscaled and blurry), very large ones, transparency
(trained as black unless flattened), missing, empty or badly encoded captions, stray files. It also counts
images × repeats and the steps per epoch for the batch size, like kohya's own log.

On a T4, SD1.5 trains at 512 px (the preset's resolution). A bad result is any **error** line: the trainer
would stop on it. `QUARANTINE = True` moves unusable files out of the project copy into `quarantine/`
(never your originals); `nbkit dataset check --fix_to DIR` writes repaired copies instead.""",
     """from nbkit.data.check import check_dataset
from nbkit.data.fix import quarantine_problems

config = session.config("lora")  # the resolution and batch size the run will use
report = check_dataset(session.project, resolution=config.resolution, batch_size=config.train_batch_size)
print(report)
QUARANTINE = True
if QUARANTINE and report.by_severity("error"):
    print(f"moved {len(quarantine_problems(report, session.path / 'quarantine', session.project))} files")"""),
    ("""## 3. Near-duplicates
Duplicates (the same picture re-saved, resized or lightly cropped) make the model see one pose or background
several times as often as the others, so it memorises it. Each group below shows the image that is kept
first (the largest, lossless preferred) and its near-copies with their distance. `threshold` is the number
of differing bits of a 64-bit perceptual hash: 4 finds re-saves and resizes; 8-10 also finds close crops,
with more false alarms, so look at the groups before removing anything.""",
     """from nbkit.data.dedup import find_near_duplicates, show_groups

duplicates = find_near_duplicates(session.project, threshold=4)
print(duplicates.summary())
show_groups(duplicates);"""),
    ("""Remove the extra copies: they move out of the project copy into `<project>/quarantine/` with a log
(move them back to undo). Running this again finds nothing more to move.""",
     """from nbkit.data.dedup import quarantine_duplicates

REMOVE_DUPLICATES = True
if REMOVE_DUPLICATES and duplicates.groups:
    moved = quarantine_duplicates(duplicates, session.path / "quarantine", session.project)
    print(f"moved {len(moved)} files to {session.path / 'quarantine'}")"""),
    ("""## 4. Look at every image
The gallery shows each image with its caption and its aspect-ratio bucket as the trainer will use them.
Look for what the model should *not* learn: watermarks, text, borders, crops that cut the subject, the same
background everywhere, captions that do not match the picture. Next: `02_tag` writes or improves captions.""",
     """from nbkit.data.gallery import dataset_gallery

dataset_gallery(session.project, limit=48, resolution=config.resolution, show=False)"""),
]

# ----------------------------------------------------------------------------------------------- 02
TAG = [
    ("""## 1. WD14 tags (anime and illustration)
The WD14 tagger writes danbooru-style tags (`1girl, long_hair, smile, ...`) with a confidence for each; tags
above `thresh` are written. 0.35 is kohya's default: lower gives more tags and more wrong ones, higher fewer
and safer ones. `existing_captions="append"` keeps captions you already have and adds the new tags;
`"overwrite"` replaces them; every changed file is backed up first (`nbkit captions undo DIR`). The v3
models (`SmilingWolf/wd-swinv2-tagger-v3`, `wd-eva02-large-tagger-v3`) are kohya's recommendation. With
onnxruntime-gpu a T4 tags a thousand images in minutes; on the CPU it is many times slower. A bad
result: tags for things that are not there (`monochrome` on colour pictures): raise `thresh`.""",
     """from nbkit.tag.config import WD14Config
from nbkit.tag.wd14 import tag_images

USE_WD14 = True
TAGGER = "SmilingWolf/wd-swinv2-tagger-v3"
if USE_WD14:
    options = WD14Config(**session.tagger("wd14", TAGGER), thresh=0.35, existing_captions="append", recursive=True)
    tagged = tag_images(session.dataset_dir, options)"""),
    ("""## 2. BLIP captions (photos)
For photos, a sentence ("a man standing on a beach") describes better than booru tags. BLIP large
(`Salesforce/blip-image-captioning-large`, a 1.8 GB download) runs in fp16 on a T4. Beam search (`beam_search=True, num_beams=3`) gives steadier captions than sampling; `min_length`
and `max_length` bound their length in tokens. Switch it on for photo sets; in demo mode both taggers run
(the tiny BLIP is random, so its words are gibberish).""",
     """from nbkit.tag.blip import caption_images
from nbkit.tag.config import BlipCaptionConfig

USE_BLIP = False  # True for photos
BLIP = "Salesforce/blip-image-captioning-large"
if USE_BLIP or session.demo:
    options = BlipCaptionConfig(**session.tagger("blip", BLIP), caption_extension=".txt", beam_search=True,
                                num_beams=3, existing_captions="append", recursive=True)
    captioned = caption_images(session.dataset_dir, options)"""),
    ("""## 3. Edit all captions at once
The **trigger** (activation) tag is the word you will type to call up what was trained: `Edit.activate`
puts it first in every caption, and the printed `keep_tokens` keeps it first when tags are shuffled.
Remove tags that describe what the trigger should absorb: for a character LoRA, their permanent features
(hair colour, eye colour), so the trigger alone brings them; keep what varies (pose, clothes, background) so
it stays promptable. Remove wrong or unwanted tags everywhere. Each run is backed up: `nbkit captions undo
<dataset folder>` restores the captions from before it.""",
     """from nbkit.tag.editor import Edit, edit_captions

TRIGGER = "sks"  # a rare word: it gets the meaning of what the images share
REMOVE = ["questionable", "explicit", "sensitive"]  # tags to drop from every caption
edits = [Edit.activate(TRIGGER), Edit.remove(REMOVE), Edit.dedupe()]
print(edit_captions(session.dataset_dir, edits).summary())"""),
    ("""## 4. Tag frequency
How many captions contain each tag. The trigger should be in 100% of them. A tag in nearly every caption
that is not the trigger is a tag the model cannot separate from the subject: remove it (if it is part of the
subject) or add variety. A long tail of tags seen once is noise that mostly costs tokens.""",
     """%matplotlib inline
from nbkit.tag.stats import dataset_tag_counts, frequency_table, plot_top_tags

counts, files = dataset_tag_counts(session.dataset_dir)
print(frequency_table(counts, files, top=15))
plot_top_tags(counts, top=30)"""),
    ("""## 5. One caption at a time
The caption editor shows each image with its caption: fix what the tagger got wrong and press **save**
(backed up like the bulk edits). Use the slider or previous/next to move.""",
     """from nbkit.tag.widgets import CaptionEditor

CaptionEditor(session.dataset_dir)"""),
    ("""## 6. Check the result
The gallery again, now with the captions the trainer will read, and each image's bucket at the
resolution the run will use. Next: `03_configure`.""",
     """from nbkit.data.gallery import dataset_gallery

resolution = session.config("lora").resolution
dataset_gallery(session.project, limit=24, resolution=resolution, show=False)"""),
]

# ----------------------------------------------------------------------------------------------- 03
CONFIGURE = [
    ("""## 1. Preview prompts
During training nbkit renders these prompts at fixed seeds every few hundred steps and shows the images
live in the training monitor, so you see the model learn, and see when it starts to overcook. kohya's format:
one prompt per line, options after it (`--w`/`--h` size, `--s` steps, `--d` seed, `--l` CFG scale,
`--n` negative prompt). Use your trigger word and a few situations that are *not* in the dataset. (Demo
mode writes 64 px prompts for the tiny model instead.)""",
     """PROMPTS = [
    "sks, a photo of sks dog on a beach --w 512 --h 512 --s 20 --d 1",
    "sks, a painting of sks dog in a forest --w 512 --h 512 --s 20 --d 2",
]
print(f"preview prompts: {session.write_sample_prompts(PROMPTS)}")"""),
    ("""## 2. Method and settings
- **LoRA** (04): small adapters (10-150 MB) on the attention layers; works for characters, objects and
  styles, loads in A1111, ComfyUI, kohya and diffusers. The usual choice.
- **DreamBooth** (05): fine-tunes the whole U-Net; strongest likeness, a 2 GB model file. Fits a T4 at 512 px
  with 8-bit AdamW, gradient checkpointing and a frozen text encoder.
- **Hypernetwork** (06): A1111's small networks on attention keys and values; mostly for styles.
- **Textual inversion** (06b): a new word for the text encoder, a file of a few KB; also negative embeddings.

**Base model**: the menu above the fields lists tested starting points (SD1.5, SD2.1, SDXL and widely used
anime and photo models for SD1 and SDXL, each with its licence). Choosing one fills in its source and the
settings its architecture needs: 1024 px and the T4 memory settings for SDXL, 768 px and
`v_parameterization` for v-prediction models. For your own model choose "my own file, URL or Drive path"
and type it into `pretrained_model_name_or_path`. Models download once into the `_cache` folder beside your
projects (on Drive), so a runtime reset does not download them again.

The form starts from the T4 preset of the method (or your saved `run-<method>.toml`). The settings that
matter on a T4: `resolution` 512 (SD1.5); `train_batch_size` 1-2; `mixed_precision` fp16 (a T4 has no bf16);
`optimizer_type` AdamW8bit (a quarter of AdamW's optimizer memory); `gradient_checkpointing` (about half the
activation memory, ~20% slower); `cache_latents`. For a LoRA, `network_dim`/`network_alpha` 16-32/8-16 and
`learning_rate` 1e-4; for DreamBooth 1e-6 to 5e-6. Steps: a common starting point for a LoRA is 1500-3000
images seen in total (images × repeats × epochs). What goes wrong: a loss of NaN (learning rate too high), previews that never change (too
low, or too few steps), oversaturated "fried" previews late in the run (too many steps: use an earlier save).""",
     """from nbkit.ui.forms import ConfigForm

METHOD = "lora"  # "lora", "dreambooth", "hypernetwork" or "textual_inversion"
form = ConfigForm(session.config(METHOD), path=session.run_file(METHOD), title=f"{METHOD} settings")
form"""),
    ("""## 3. Pre-flight check
Before any model is loaded: the dataset counted as the trainer counts it (images, repeats, steps per epoch,
total steps), the peak VRAM estimated for these settings on this GPU (a T4 when there is none), and the time
it will take. When the run would not fit, the check lists the changes that make it fit.""",
     """from nbkit.colab import gpu_info
from nbkit.ui.preflight import preflight

config = form.config()  # the values in the form above (an invalid field is marked there)
check = preflight(config, METHOD, session.datasets(config, METHOD), gpu=gpu_info())
check"""),
    ("""## 4. Where the memory goes
The estimate runs one training step of the real SD1.5 model on PyTorch's meta device (no weights, no GPU)
and replays its allocations through a model of the CUDA allocator. Its parts: the frozen weights (fp16, ~2 GB
for SD1.5), the trained weights in fp32 with their gradients, the optimizer states (AdamW keeps 8 bytes per
trained weight, AdamW8bit 2), the activations kept for the backward pass (gradient checkpointing recomputes
most of them instead), the allocator's cache and the CUDA context. For a LoRA the activations dominate, so
resolution, batch size and checkpointing are the settings that decide; for DreamBooth the optimizer states
and gradients of all 860 M U-Net weights do, so 8-bit AdamW is what makes it fit a T4.""",
     """if check.estimate is not None:
    print(check.estimate.summary())"""),
    ("""## 5. Save
The suggested changes (if any) go into the form, and the settings are saved as `run-<method>.toml` in the
project: kohya option names, readable and editable, also usable from a terminal (`nbkit train lora --config
run-lora.toml`). The training notebook starts from this file.""",
     """if not check.ok and check.fitted_config is not None:
    form.set_config(check.fitted_config)  # the estimator's fix, now shown in the form
print(f"saved {form.save()}")"""),
]


def training(method: str, title: str, function: str, module: str) -> list[tuple[str, str]]:
    return [
        (f"""## 1. Settings
The form holds the saved settings (`run-{method}.toml` from 03_configure) or, without them, the T4 preset.
Change what you need; the next cell checks and saves them. To continue a run that stopped (a disconnect, the
Stop button, a runtime reset), set `resume` to `latest`: the newest state folder in the project brings back
the weights, the optimizer, the schedule and the random generators, so the run continues exactly.""",
         f"""from nbkit.ui.forms import ConfigForm

form = ConfigForm(session.config("{method}"), path=session.run_file("{method}"), title="{title} settings")
form"""),
        ("""## 2. Pre-flight check
Steps, peak VRAM and time for these settings, before anything heavy loads. If it says the run does not fit,
apply its suggested changes in the form (or in 03_configure) and run this cell again.""",
         f"""from nbkit.colab import gpu_info
from nbkit.ui.preflight import preflight

config = form.config()
form.save()
datasets = session.datasets(config, "{method}")
check = preflight(config, "{method}", datasets, gpu=gpu_info())
check"""),
        ("""## 3. Train
The monitor shows progress with the time left, the loss curve, the preview images as they are made, and a
**Stop** button (it stops after the current step and saves the file and the state, so nothing is lost).
A diffusion loss is noisy and hardly falls; what matters is that it stays finite (NaN: stop, lower the
learning rate) and that the previews move towards your subject without turning oversaturated. If the
pre-flight check said the run does not fit, its changes are applied first (or the cell stops with the
reason) rather than running out of memory an hour in.""",
         f"""from {module} import {function}
from nbkit.ui.monitor import TrainingMonitor

config = session.fit_or_stop(check, config)  # the pre-flight fix, or a stop with the reason
monitor = TrainingMonitor(config, title="{title}")
display(monitor)
result = {function}(config, datasets, hooks=monitor)"""),
        ("""## 4. Try it
The preview prompts rendered with the trained result (same seeds as during training), saved with the
run's own previews in `output/sample/`. Compare with the base model in 07_merge.""",
         """session.preview(result.pipeline, config)"""),
    ] + ([] if method == "dreambooth" else [
        ("""## 5. Pick the best save: an X/Y grid
AUTOMATIC1111's X/Y plot: one row per saved file (the base model on top, then the saves in order), one
column per preview prompt, the same seed down each column, so a row differs from the next only by training.
Look for the earliest row where the subject is right; later rows that turn oversaturated or copy the
training images are overtrained. `strengths=[0.5, 0.75, 1.0]` instead compares strengths of the final file.
The grid is saved as `samples/<name>-xy.png`. From a terminal: `nbkit generate MODEL --files ... --prompt ...`
(prompts may carry A1111 tags like `<lora:name:0.8>`).""",
         f"""grid = session.xy_grid("{method}")  # or strengths=[0.5, 0.75, 1.0]
print(f"saved {{grid.path}}")
grid"""),
    ]) + [
        ("""## Files
What the run wrote to the project (final file first). Intermediate saves let you pick an earlier, less
overtrained version. Next: `07_merge` (resize, bake into a checkpoint, compare) or `08_export`.""",
         f"""for path in session.outputs("{method}"):
    print(path)"""),
    ]


LORA_INTRO = """A LoRA adds small low-rank matrices next to the attention (and optionally text-encoder) weights of a
frozen base model: only they train, so it fits a T4 with room to spare and the result is a 10-150 MB file
that loads in A1111, ComfyUI, kohya and diffusers (kohya's format, with its `ss_*` metadata). With the T4
preset (512 px, batch 2, dim 32/alpha 16, AdamW8bit, fp16, gradient checkpointing, cached latents) the
pre-flight check below estimates the peak VRAM and the time of your run before it starts."""

DREAMBOOTH_INTRO = """DreamBooth fine-tunes every U-Net weight on your images, so the subject becomes part of the model: the
strongest likeness, saved as one 2 GB fp16 `.safetensors` that A1111 and ComfyUI load as a checkpoint.
**Prior preservation** keeps the class from drifting (every "dog" turning into your dog): `num_class_images`
(100-200) pictures of the class are generated with the base model once, kept in the project and trained
alongside at `prior_loss_weight`. On a T4 at 512 px: batch 1, 8-bit AdamW, gradient checkpointing, a frozen
text encoder with cached outputs, `learning_rate` 1e-6 to 5e-6 and a few hundred to 2000 steps. Too many
steps or a high rate overfits: every prompt returns a training image. Set `network_module = networks.lora`
to train a LoRA on this DreamBooth data instead."""

HYPERNETWORK_INTRO = """A hypernetwork (A1111's format, `.pt`) is a set of small networks that transform the attention keys and
values of the base model; A1111 loads it from `models/hypernetworks` with a strength. It suits styles. The
A1111 options keep their names: `layer_structure` ("1, 2, 1"), `activation_func`, `weight_init`, and a
learning rate that can be a schedule string, `5e-5:100, 5e-6:1500, 5e-7` (5e-5 until step 100, then 5e-6,
then 5e-7). A1111's defaults (AdamW, lr 1e-5) are slow but stable; too high a rate gives NaN or noise."""

TEXTUAL_INVERSION_INTRO = """Textual inversion teaches the text encoder **one new word**. The token you choose (`token_string`) gets
its own rows in the text encoder's embedding table, one per vector (`num_vectors_per_token`), started from
a word of similar meaning (`init_word`); those rows are the only weights that train. The U-Net, the VAE and
every other word stay exactly as they were, so the result is a file of a few KB that works with any model of
the same family (SD1 embeddings with SD1 models, SDXL with SDXL). It learns less than a LoRA (it can only
find what the model can already draw), but it is small, combines freely with other embeddings and LoRAs, and
is how **negative embeddings** are made: train on the faults you want gone (bad hands, blur, JPEG noise) and
put the word in the *negative* prompt.

Using the file: AUTOMATIC1111 loads it from `stable-diffusion-webui/embeddings/`, ComfyUI from
`models/embeddings/` (written `embedding:sksemb` in a prompt), diffusers with
`pipe.load_textual_inversion(path, token="sksemb")`. A1111 and ComfyUI take the **file name** as the word, so
`output_name` is the token. The word must be new to the tokenizer (`sks` is a real token, hence `sksemb`)."""

TEXTUAL_INVERSION = [
    ("""## 1. Settings
The form holds the saved `run-textual_inversion.toml` or, without it, T4 starting values. The fields that
matter: `token_string` (the word), `init_word` (where it starts: `person`, `dog`, `painting`; unset starts
from zeros as A1111 does), `num_vectors_per_token` (1 for a simple subject, 4-8 for a face or a style, each one
using a place of the 75 in a prompt) and the prompts it trains on: `template_file` `subject_filewords.txt`
(A1111: "a photo of a [name], [filewords]" with your captions), or kohya's `use_object_template` /
`use_style_template`, or your captions when they contain the token. Embeddings train at a high
`learning_rate` (A1111's 0.005) because only a few hundred numbers change. To continue a stopped run, set
`resume` to `latest`.""",
     """from nbkit.ui.forms import ConfigForm

form = ConfigForm(session.config("textual_inversion"), path=session.run_file("textual_inversion"),
                  title="Textual inversion settings")
form"""),
    ("""## 2. Pre-flight check
The dataset counted as the trainer counts it: images, repeats, steps per epoch and total steps. The preview
prompts get the token put first (`sample_prompts-<token>.txt`), so the monitor shows what the word means as
it trains. The VRAM estimator does not model textual inversion yet; the gradients flow back through the
frozen U-Net, so the memory is close to a LoRA run's at the same resolution and batch size (the LoRA
notebook's check is an upper bound), and far below a T4's 15 GB at 512 px with batch 1.""",
     """from nbkit.colab import gpu_info
from nbkit.ui.preflight import preflight

config = session.token_prompts(form.config())  # previews with the token in the prompt
session.save_config(config, "textual_inversion")
datasets = session.datasets(config, "textual_inversion")
check = preflight(config, "textual_inversion", datasets, gpu=gpu_info(), estimate=False)
check"""),
    ("""## 3. Train
The monitor shows progress with the time left, the loss curve, the previews as they are made, and a **Stop**
button (the file and the resumable state are saved first). Only the new rows change: the loss barely moves,
and the previews drift from the `init_word` towards your subject. Too high a rate shows as NaN or as
previews that ignore the rest of the prompt: lower `learning_rate` or use an earlier save.""",
     """from nbkit.train.textual_inversion import train_textual_inversion
from nbkit.ui.monitor import TrainingMonitor

config = session.fit_or_stop(check, config)
monitor = TrainingMonitor(config, title="Textual inversion")
display(monitor)
result = train_textual_inversion(config, datasets, hooks=monitor)"""),
    ("""## 4. Try it
The preview prompts, with the token, rendered by the base model that now knows the word (same seeds as
during training). Put the word anywhere in a prompt; the more vectors, the more it dominates.""",
     """session.preview(result.pipeline, config)"""),
    ("""## 5. What is in the file
kohya's and A1111's `.safetensors` layout: `emb_params` with one row per vector for SD1/SD2, `clip_l` and
`clip_g` for SDXL (one table per text encoder). `save_as = "pt"` writes A1111's `.pt` instead. These few
numbers are the whole embedding.""",
     """from safetensors import safe_open

with safe_open(str(result.embedding_path), "pt") as f:
    print({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})"""),
    ("""## Files
What the run wrote (final file first, then the intermediate saves). Copy the one you like into
`embeddings/` of A1111 or `models/embeddings/` of ComfyUI, renamed to the word you want to type (08_export
copies it to a Drive folder).""",
     """for path in session.outputs("textual_inversion"):
    print(path)"""),
]

# ----------------------------------------------------------------------------------------------- 07
MERGE = [
    ("""## 1. The inputs
The newest LoRA from 04 and the base model it was trained on (a Hub id is downloaded once into the
Hugging Face cache; a local file or folder is used as it is).""",
     """lora = session.latest("lora")
base = session.base_model_path("lora")
print(f"LoRA: {lora}\\nbase: {base}")"""),
    ("""## 2. Resize the LoRA
A LoRA's rank sets its size: rank 32 to 8 divides the file by four. Resizing keeps the most important
directions of each layer (an SVD); the summary says how much of each layer's weight survives (the
Frobenius norm retained): the closer to 100%, the closer to the original; check it in the comparison below.
`dynamic_method="sv_fro", dynamic_param=0.9` picks a rank per layer instead.""",
     """from nbkit.merge.lora_merge import resize_lora_file

NEW_RANK = 8
small = session.output_dir / f"{lora.stem}-rank{NEW_RANK}.safetensors"
print(resize_lora_file(lora, small, new_rank=NEW_RANK, save_precision="fp16", overwrite=True).summary())"""),
    ("""## 3. Bake the LoRA into the model
Adds the LoRA (times a strength) into the base weights and writes a complete checkpoint: one file that
works without any LoRA support, at the strength you chose. A strength of 0.6-0.9 usually keeps more of the
base model's flexibility than 1.0. Large files are streamed tensor by tensor, so this fits Colab's RAM.""",
     """from nbkit.merge.lora_into import merge_lora_into

STRENGTH = 0.8
baked = session.output_dir / f"{lora.stem}-baked.safetensors"
print(merge_lora_into(base, [(lora, STRENGTH)], baked, save_precision="fp16", overwrite=True).summary())"""),
    ("""## 4. Merge two checkpoints
A1111's checkpoint merger: *weighted sum* gives (1 - M)·A + M·B; *add difference* gives A + M·(B - C), which
moves what B learned over its base C onto another model A. A DreamBooth model merged back into its base at
M = 0.3-0.5 keeps the subject and regains flexibility. This uses your DreamBooth model from 05 if there is
one (skipped otherwise).""",
     """from nbkit.merge.checkpoints import merge_checkpoints

dreambooth = session.latest("dreambooth", required=False)
merged = session.output_dir / "dreambooth-merged-0.5.safetensors"
if dreambooth:
    result = merge_checkpoints(base, dreambooth, out=merged, multiplier=0.5, save_as_half=True, overwrite=True)
    print(result.summary())"""),
    ("""## 5. Compare
The same prompts and seeds with each model, one row per model. What to look for: the subject appears with
the LoRA or DreamBooth models and not with the base; the resized and full LoRA look alike (if not, resize to a
higher rank); the merged model keeps the subject while following the prompt better.""",
     """from nbkit.compare import compare_models

models = {"base": base, "LoRA baked": baked, "DreamBooth merged": merged}
compare_models(models, session.sample_prompts, resolution=session.config("lora").resolution)"""),
]

# ----------------------------------------------------------------------------------------------- 08
EXPORT = [
    ("""## 1. What to export
The final file of one training method from this project.""",
     """METHOD = "lora"  # "lora", "dreambooth", "hypernetwork" or "textual_inversion"
model = session.latest(METHOD)
print(model)"""),
    ("""## 2. Copy to a Drive folder
When the project is on Drive the trained files are already there. This copies them to another Drive
folder too, for example the one a Drive-based A1111 or ComfyUI reads (`models/Lora`, `models/Stable-diffusion`,
`models/hypernetworks`). Each copy is written under a temporary name, read back and checked by size and
sha256, then renamed, and the cell waits until Drive shows the file (Drive can lag behind by minutes).
An identical file already there is left alone. In demo mode a temporary folder stands in for Drive.""",
     """from nbkit.export.drive import export_to_folder

DEST = "/content/drive/MyDrive/sd/models/Lora"  # a folder on Drive
for copy in export_to_folder([model], session.export_folder(DEST)):
    print(f"{copy.target}: {copy.size} bytes, sha256 {copy.sha256[:12]}, {'copied' if copy.copied else 'already there'}")"""),
    ("""## 3. The upload plan (nothing is sent)
Publishing to the Hugging Face Hub sends exactly the files listed here: the model, preview images, the run
settings and dataset config with local paths and secrets removed, and a generated model card. The repo is
private unless you say otherwise. Leave `REPO_ID` empty to only look.""",
     """from nbkit.export.plan import format_plan

REPO_ID = ""  # "your-name/my-lora" to publish; empty: preview only
plan = session.upload_plan(METHOD, REPO_ID, private=True)
print(format_plan(plan))"""),
    ("""## 4. The model card
The README the Hub will show: base model, trigger words, training settings, sample images and how to use
the file in diffusers, A1111 and ComfyUI. Check it before uploading; to change it, edit the generated
`README.md` and pass it as `card_file` to `nbkit.export.plan.build_plan` (or `--card` to `nbkit export hub`).""",
     """from IPython.display import Markdown

Markdown(plan.item("README.md").data.decode("utf-8"))"""),
    ("""## 5. Upload
The token comes from the Colab secret `HF_TOKEN` or the box below (cleared at once, never printed or saved).
The upload happens only when `REPO_ID` is set, a token is there, and this is not the demo. If it is
interrupted, run it again.""",
     """from nbkit.runtime import hub_login

login = hub_login()
login"""),
    ("""Send the files in the plan above as one commit.""",
     """from nbkit.export.hub import upload

if REPO_ID and login is not None and login.token is not None:
    print(upload(plan, login.token))
else:
    print("not uploaded: set REPO_ID and a token above (the demo never uploads)")"""),
    ("""## 6. Project size and cleanup
Drive's free 15 GB fill up with intermediate saves and resumable states. The list shows what each project
folder takes and which old saves and states could go (the newest of each run is kept). Nothing is removed
unless you set `APPLY = True`.""",
     """from nbkit.export.drive import apply_cleanup, cleanup_plan, format_cleanup, format_usage, project_usage

print(format_usage(project_usage(session.project)))
APPLY = False
old = cleanup_plan([session.output_dir, session.state_dir], keep=1)
if APPLY:
    apply_cleanup(old)
print(format_cleanup(old, applied=APPLY))"""),
]

# ------------------------------------------------------------------------------------------ quickstart
QUICKSTART = [
    (INSTALL_MD, INSTALL),
    ("""## Settings
`STEPS` is the number of optimizer steps: 60 take well under a minute on a CPU with the tiny model. Leave
`MODEL` empty for the tiny model; on a GPU runtime put a Hub id such as
`"stable-diffusion-v1-5/stable-diffusion-v1-5"` (or a `.safetensors` path) there to train the same demo for
real at 512 px.""",
     """STEPS = 60
MODEL = ""
OUT = "nbkit-demo\""""),
    ("""## Train
`run_demo` writes everything into `OUT`: the tiny model, the dataset, the run file (`demo_run.toml`, kohya
option names), the LoRA (`output/demo_lora.safetensors`, kohya format), a preview grid and a loss curve.""",
     """from nbkit.demo import run_demo

paths = run_demo(OUT, model=MODEL, steps=STEPS)"""),
    ("""## Look at the results
Top row: before training; middle: after; bottom: the difference, amplified. Same prompts, same seeds. The
loss curve should drift down; a curve that jumps to NaN or climbs means the learning rate is too high.""",
     """from IPython.display import Image, display

display(Image(filename=str(paths["preview"])))
display(Image(filename=str(paths["loss_curve"])))"""),
    ("""## What is in the LoRA file
kohya's format: for each adapted layer a `lora_down`, a `lora_up` and an `alpha`, plus `ss_*` training
metadata that A1111 shows in its LoRA tab.""",
     """from safetensors import safe_open

with safe_open(str(paths["lora"]), "pt") as f:
    keys = list(f.keys())
    meta = f.metadata()
print(len(keys), "tensors, e.g.", keys[:3])
print({k: meta[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_steps", "ss_base_model_version")})"""),
]

NOTEBOOKS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "00_setup": ("00 · Setup: install nbkit, check the GPU, connect Drive", """Run this first in a new Colab
runtime. It installs nbkit on top of Colab's own PyTorch, reports the GPU and its free memory, mounts Google
Drive for your project folder and, if you want, logs in to the Hugging Face Hub. It ends with one line that
says whether everything is ready. Rerunning it is quick and changes nothing. Every later notebook also works
on its own after a runtime reset: it reinstalls nbkit if needed and reads the project folder.

**No GPU?** Set `DEMO = True` in the first cell below and run it (in any other notebook, put
`%env NBKIT_DEMO=1` in a cell before the others): the whole suite then runs on a tiny model and a drawn
sample dataset, with runs of a few steps, in minutes on a CPU.

The notebooks, in order: `01_dataset` → `02_tag` → `03_configure` → `04_train_lora` / `05_train_dreambooth` /
`06_train_hypernetwork` / `06b_train_textual_inversion` → `07_merge` → `08_export`.""", SETUP),
    "01_dataset": ("01 · Dataset: import, check, deduplicate, look", """The dataset decides what the model learns
more than any setting does. This notebook copies your images into the project, checks them the way the
trainer will read them, removes near-duplicates and shows every image with its caption.""",
                   common("dataset") + DATASET),
    "02_tag": ("02 · Captions: tag, edit, count", """Captions tell the trainer what is in each image, and by
leaving things out, what the trigger word should mean. This notebook writes captions with a tagger (WD14 tags
for anime and illustration, BLIP sentences for photos), edits them in bulk (trigger word first, unwanted tags
out), shows tag frequencies and lets you fix single captions.""", common("tag") + TAG),
    "03_configure": ("03 · Configure: method, settings, does it fit a T4?", """Choose the training method and its
settings, see the steps, peak VRAM and time before spending GPU time, apply the estimator's fixes when it
does not fit, and save the settings to the project for the training notebook.""",
                     common("configure") + CONFIGURE),
    "04_train_lora": ("04 · Train a LoRA", LORA_INTRO,
                      common("train") + training("lora", "LoRA", "train_lora", "nbkit.train.lora")),
    "05_train_dreambooth": ("05 · Train with DreamBooth", DREAMBOOTH_INTRO,
                            common("train") + training("dreambooth", "DreamBooth", "train_dreambooth",
                                                       "nbkit.train.dreambooth")),
    "06_train_hypernetwork": ("06 · Train an A1111 hypernetwork", HYPERNETWORK_INTRO,
                              common("train") + training("hypernetwork", "Hypernetwork", "train_hypernetwork",
                                                         "nbkit.train.hypernetwork")),
    "06b_train_textual_inversion": ("06b · Train a textual inversion embedding", TEXTUAL_INVERSION_INTRO,
                                    common("train") + TEXTUAL_INVERSION),
    "07_merge": ("07 · Merge: resize, bake, blend, compare", """What to do with a trained result before sharing
it: make a LoRA smaller, bake it into a checkpoint that needs no LoRA support, blend checkpoints the way
A1111's merger does, and compare them all on the same prompts and seeds. Every tool streams tensors, so
SD1.5 checkpoints fit a free Colab's RAM.""", common("merge") + MERGE),
    "08_export": ("08 · Export: Drive and the Hugging Face Hub", """Get the results off the Colab VM: a verified
copy to a Drive folder, and a Hugging Face Hub repo with a generated model card. You see the upload plan and
the card before anything is sent; the repo is private by default, and the token is never shown.""",
                  common("export") + EXPORT),
    "quickstart_demo": ("nbkit quick start: a LoRA from start to finish", """This notebook runs the whole LoRA path
once, on a **tiny model built from code** and a **drawn sample dataset**, so it finishes in about a minute
even without a GPU and downloads nothing: it builds a tiny Stable Diffusion model (SD1.5's architecture, a
few million random weights), draws 12 captioned images of coloured shapes in kohya's folder layout, trains a
LoRA with kohya's option names, and renders the same prompts with the same seeds before and after. The tiny
model is random, so its pictures are noise: what matters is the path, the files it writes and the
*difference* the LoRA makes. The numbered notebooks (`00_setup` ... `08_export`) do each step for real.""",
                        QUICKSTART),
}


def build(name: str, title: str, intro: str, sections: list[tuple[str, str]]) -> dict:
    cells = [_cell("markdown", f"# {title}\n\n{badge(name)}\n\n{intro}", name, 0)]
    for markdown, code in sections:
        cells.append(_cell("markdown", markdown, name, len(cells)))
        cells.append(_cell("code", code, name, len(cells)))
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "T4", "toc_visible": True},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _cell(kind: str, source: str, name: str, index: int) -> dict:
    lines = source.strip("\n").splitlines(keepends=True)
    cell = {"cell_type": kind, "id": f"{name.replace('_', '-')}-{index:02d}", "metadata": {}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def render(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, (title, intro, sections) in NOTEBOOKS.items():
        path, text = HERE / f"{name}.ipynb", render(build(name, title, intro, sections))
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
