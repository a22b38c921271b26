"""The model repository layout (Triton-like): REPO/NAME/VERSION/model.onnx + model.json."""

from __future__ import annotations

from pathlib import Path


def version_dir(repository: Path, name: str, version: int) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad model name {name!r}")
    if version < 1:
        raise ValueError(f"versions count from 1, not {version}")
    return Path(repository) / name / str(version)


def existing_versions(repository: Path, name: str) -> list[int]:
    folder = Path(repository) / name
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()
    )


def next_version(repository: Path, name: str) -> int:
    versions = existing_versions(repository, name)
    return versions[-1] + 1 if versions else 1
