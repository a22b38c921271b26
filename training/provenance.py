"""Where a set of weights came from: the code's commit, the command, the machine and the
arithmetic it trained in, and how long it took. Recorded in every checkpoint; export copies
it into the model card, so a served model says how to make it again."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent  # the checkout segserve runs from, if any


def git_commit(folder: Path = SOURCE) -> str | None:
    """The checkout's commit, with '-dirty' when tracked files differ from it; None when
    segserve is not running from a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name and what matters for training speed: AVX-512, native bf16, AMX."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    if not features:
        features = ["avx2"] if "avx2" in flags else []
    return f"{name} ({', '.join(features) or 'no AVX'})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def arithmetic(amp_dtype: torch.dtype | None) -> str:
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def data_description(root: Path) -> dict:
    """What a data folder says of itself (classes.json: a synthetic set's generator settings)."""
    try:
        meta = json.loads((Path(root) / "classes.json").read_text())
    except (OSError, ValueError):
        return {"folder": str(root)}
    return {
        "folder": str(root),
        **{k: v for k, v in meta.items() if k not in ("class_names", "palette")},
    }


def record(
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: int,
    config: dict,
    data: Path,
    argv: list[str] | None = None,
) -> dict:
    """The provenance of a run (taken once, when it starts: the git and /proc reads cost more
    than a tiny epoch); `config` is the run's TrainConfig (JSON), `data` its data folder. The
    checkpoint adds `train_seconds` as it goes."""
    argv = sys.argv if argv is None else argv
    return {
        "commit": git_commit(),
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "",
        "config": config,
        "data": data_description(data),
        "device": device_name(device),
        "processes": world,
        "threads": torch.get_num_threads(),
        "arithmetic": arithmetic(amp_dtype),
        "torch": str(torch.__version__),
    }
