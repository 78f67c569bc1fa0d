"""Two CPU processes (torchrun -> accelerate MULTI_CPU) train one run and save one LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from safetensors.torch import load_file

from nbkit.demo import make_sample_dataset

RANK_DUMP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from safetensors.torch import save_file
    from nbkit.networks.lora import export_kohya_state_dict
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import load_run_config, resolve_datasets

    config, inline, base = load_run_config(sys.argv[1], LoRATrainConfig)
    result = train_lora(config, resolve_datasets(config, inline, base))
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = export_kohya_state_dict(result.pipeline.unet, result.pipeline.text_encoder)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(sys.argv[2]) / f"rank{rank}.safetensors"))
    """
)


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_two_cpu_processes_train_one_lora(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    run = tmp_path / "run.toml"
    run.write_text(
        f'pretrained_model_name_or_path = "{model_dir}"\noutput_dir = "{tmp_path / "out"}"\noutput_name = "mp"\n'
        "resolution = 64\nnetwork_dim = 2\nmax_train_steps = 3\noptimizer_type = 'AdamW'\nmixed_precision = 'no'\n"
        "gradient_checkpointing = false\nlearning_rate = 0.01\n"
        f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{images}"\ncaption_extension = ".txt"\n'
    )
    # The CLI runs unchanged under torchrun: accelerate's multi-CPU mode, one LoRA from the main process.
    cli = _torchrun("-m", "nbkit", "train", "lora", "--config", str(run), cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.count("LoRA:") == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["mp.safetensors"]

    script = tmp_path / "rank_dump.py"
    script.write_text(RANK_DUMP)
    dump = _torchrun(str(script), str(run), str(tmp_path), cwd=tmp_path)
    assert dump.returncode == 0, dump.stderr[-2000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    saved = load_file(str(tmp_path / "out" / "mp.safetensors"))
    assert rank0.keys() == rank1.keys() == saved.keys()
    assert all((rank0[k] - rank1[k]).abs().max() == 0 for k in rank0)  # DDP kept both replicas identical
    assert all((rank0[k] - saved[k]).abs().max() == 0 for k in rank0)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_up" in k)
