"""The body of a model card: what the file is, how to use it in diffusers, A1111 and ComfyUI, how it was trained."""

from __future__ import annotations

from pathlib import PurePosixPath

from nbkit.export.card_facts import CardFacts

WHAT = {
    "lora": "a LoRA (kohya format) for",
    "hypernetwork": "an AUTOMATIC1111 hypernetwork for",
    "dreambooth": "a DreamBooth fine-tune of",
}

CONVERT = ("This repo holds a diffusers folder and {app} loads single files: convert it with "
           "`nbkit convert to-single-file <folder> model.safetensors` and put that in `{folder}`.")


def _prompt(facts: CardFacts) -> str:
    if facts.widgets:
        return facts.widgets[0][0]
    return facts.instance_prompt or (", ".join(facts.trigger_words) or "a photo")


def _code(text: str, lang: str = "python") -> str:
    return f"```{lang}\n{text.strip()}\n```"


def diffusers_usage(facts: CardFacts) -> str:
    repo, file, prompt = facts.repo_id, facts.weight_files[0], _prompt(facts).replace('"', '\\"')
    head = "import torch\nfrom diffusers import StableDiffusionPipeline\n\n"
    base = f'pipe = StableDiffusionPipeline.from_pretrained("{facts.base_model}", torch_dtype=torch.float16).to("cuda")\n'
    run = f'image = pipe("{prompt}", num_inference_steps=30, guidance_scale=7).images[0]\nimage.save("out.png")'
    if facts.kind == "lora":
        return _code(f'{head}{base}pipe.load_lora_weights("{repo}", weight_name="{file}")\n{run}')
    if facts.kind == "hypernetwork":
        return ("diffusers has no hypernetwork loader; nbkit applies A1111 hypernetworks to a diffusers pipeline "
                "(`pip install nbkit`):\n\n" + _code(
                    f"{head}from huggingface_hub import hf_hub_download\n"
                    "from nbkit.networks.hypernetwork import Hypernetwork, apply_hypernetwork\n\n"
                    f'{base}apply_hypernetwork(pipe, Hypernetwork.load(hf_hub_download("{repo}", "{file}")), '
                    f"strength=1.0)\n{run}"))
    if facts.diffusers_folder:
        return _code(f'{head}pipe = StableDiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16)'
                     f'.to("cuda")\n{run}')
    return _code(f"{head}pipe = StableDiffusionPipeline.from_single_file(\n"
                 f'    "https://huggingface.co/{repo}/blob/main/{file}", torch_dtype=torch.float16).to("cuda")\n{run}')


def webui_usage(facts: CardFacts) -> str:
    file = facts.weight_files[0]
    stem = PurePosixPath(file).stem
    if facts.kind == "lora":
        return (f"Put `{file}` in `stable-diffusion-webui/models/Lora`, then add `<lora:{stem}:0.8>` to the prompt "
                "(0.8 is the strength; try 0.6-1.0).")
    if facts.kind == "hypernetwork":
        return (f"Put `{file}` in `stable-diffusion-webui/models/hypernetworks`, then add `<hypernet:{stem}:1>` to the "
                "prompt (or pick it under Settings > Stable Diffusion > Hypernetwork).")
    if not file.endswith((".safetensors", ".ckpt")):
        return CONVERT.format(app="A1111", folder="stable-diffusion-webui/models/Stable-diffusion")
    return f"Put `{file}` in `stable-diffusion-webui/models/Stable-diffusion` and pick it in the checkpoint list."


def comfyui_usage(facts: CardFacts) -> str:
    file = facts.weight_files[0]
    if facts.kind == "lora":
        return (f"Put `{file}` in `ComfyUI/models/loras` and add a **Load LoRA** node between **Load Checkpoint** and "
                "the CLIP Text Encode / KSampler nodes.")
    if facts.kind == "hypernetwork":
        return (f"Put `{file}` in `ComfyUI/models/hypernetworks` and add a **HypernetworkLoader** node after "
                "**Load Checkpoint**.")
    if not file.endswith((".safetensors", ".ckpt")):
        return CONVERT.format(app="ComfyUI", folder="ComfyUI/models/checkpoints")
    return f"Put `{file}` in `ComfyUI/models/checkpoints` and select it in the **Load Checkpoint** node."


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _table(rows: dict[str, str]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def training_section(facts: CardFacts) -> str:
    rows = dict(facts.settings)
    if facts.steps is not None:
        rows = {"steps trained": str(facts.steps), **rows}
    parts = ["## Training", "", _table(rows) if rows else "No training settings were recorded."]
    if facts.dataset_images is not None:
        repeats = (f" ({facts.dataset_repeats} per epoch with repeats)"
                   if facts.dataset_repeats and facts.dataset_repeats != facts.dataset_images else "")
        parts += ["", f"Dataset: {facts.dataset_images} images{repeats}."]
    parts += ["", "Files: " + ", ".join(f"`{f}`" for f in facts.weight_files) + "."]
    return "\n".join(parts)


def samples_section(facts: CardFacts) -> str:
    if not facts.widgets and not facts.gallery:
        return ""
    lines = ["## Samples", ""]
    lines += [f"![{prompt}]({path})\n\n`{prompt}`\n" for prompt, path in facts.widgets]
    lines += [f"![sample]({path})\n" for path in facts.gallery]
    return "\n".join(lines)


def card_body(facts: CardFacts) -> str:
    intro = f"This is {WHAT[facts.kind]} [{facts.base_model}](https://huggingface.co/{facts.base_model}), trained with nbkit."
    parts = [f"# {facts.title}", "", intro]
    if facts.base_model_note:
        parts += ["", facts.base_model_note]
    if facts.trigger_words or facts.instance_prompt:
        words = ", ".join(f"`{w}`" for w in facts.trigger_words)
        prompt = f" (instance prompt: `{facts.instance_prompt}`)" if facts.instance_prompt else ""
        parts += ["", "## Trigger words", "", f"Use {words or 'the instance prompt'} in your prompt{prompt}."]
    if samples := samples_section(facts):
        parts += ["", samples]
    parts += ["", "## How to use", "", "### diffusers", "", diffusers_usage(facts), "",
              "### AUTOMATIC1111 / Forge", "", webui_usage(facts), "", "### ComfyUI", "", comfyui_usage(facts),
              "", training_section(facts), ""]
    return "\n".join(parts)
