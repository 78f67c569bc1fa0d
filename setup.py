"""nbkit: train Stable Diffusion LoRAs, DreamBooth models and hypernetworks on a free Colab GPU."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
OPTIMIZERS = ["lion-pytorch>=0.2", "prodigyopt>=1.1", "dadaptation>=3.2"]
# LyCORIS networks (network_module = "lycoris.kohya"): the reference implementation itself (pulls einops, toml)
LYCORIS = ["lycoris-lora>=4.1.3,<4.2"]
version = {}
exec((here / "nbkit" / "_version.py").read_text(), version)

setup(
    name="nbkit",
    version=version["__version__"],
    description="Colab/Jupyter notebooks and a small library to train SD LoRA, DreamBooth and hypernetworks",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nbkit", "nbkit.*"]),
    include_package_data=True,
    package_data={
        "nbkit": ["assets/*", "assets/templates/*"],  # templates: A1111's hypernetwork prompt templates
        # real SD1.5/SD2.1 diffusers configs for offline single-file loading (nbkit/models/configs)
        "nbkit.models": ["configs/*/*.json", "configs/*/*/*.json"],
    },
    # Honest lower bounds; fast-moving libraries capped below the next minor release we have not
    # tested (transformers 5.25 once broke every text-encoder LoRA through its peft gate). The exact
    # tested set is requirements.txt, applied as constraints by the README, .ci/run and the notebooks.
    # Raise a cap only after the suite passed on the new version (.ci/run's drift check shows it).
    install_requires=[
        # torch is never pinned to a CUDA build: Colab's own torch must stay as it is.
        "torch>=2.1",
        "diffusers>=0.42,<0.43",
        "transformers>=5.6,<5.26",
        "accelerate>=1.0,<1.17",
        "peft>=0.21,<0.22",
        "safetensors>=0.4",
        "bitsandbytes>=0.50,<0.51",
        "ipywidgets>=8",
        "matplotlib>=3.7",
        "huggingface_hub>=1.0,<2.5",
        "pillow>=10",
        "tqdm>=4.66",
        "tomli-w>=1.0",
        "numpy>=1.24",
        "imagehash>=4.3",  # near-duplicate detection (nbkit dataset dedup)
    ],
    extras_require={
        # the tests also exercise the optional optimizers and LyCORIS, so dev pulls them in
        "dev": ["pytest>=8", "setuptools>=70.1",  # setuptools: the wheel test builds without isolation
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6", "ruff>=0.5", *OPTIMIZERS, *LYCORIS],
        "optimizers": OPTIMIZERS,
        "lycoris": LYCORIS,
        "tagger": ["onnxruntime>=1.17", "onnx>=1.16"],
        # on a Colab GPU: onnxruntime-gpu instead of onnxruntime (never both in one environment)
        "tagger-gpu": ["onnxruntime-gpu>=1.19", "onnx>=1.16"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["nbkit=nbkit.cli:main"]},
)
