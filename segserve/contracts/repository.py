"""The model repository's layout (Triton-like), the one walk over it that every stage uses.

    REPO/NAME/VERSION/model.onnx
    REPO/NAME/VERSION/model.json    the model card, also inside model.onnx's metadata
    REPO/NAME/VERSION/model.int8.onnx    optional variants of the same network in another
    REPO/NAME/VERSION/model.float16.onnx arithmetic, each with its own card in its metadata

VERSION is a positive integer; the newest version of a name is its default.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from segserve.contracts.card import ModelCard

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
# Names travel in URLs, metric labels and file paths: keep them to a safe alphabet.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits, no leading zero


@dataclass(frozen=True)
class VersionEntry:
    name: str
    version: int
    folder: Path

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def card_path(self) -> Path:
        return self.folder / CARD_FILE

    def variant_paths(self) -> dict[str, Path]:
        """The version's other variants by precision (model.PRECISION.onnx), model.onnx not
        included: its precision is its card's."""
        return variant_paths(self.folder)


def variant_path(folder: Path, precision: str) -> Path:
    return Path(folder) / f"model.{precision}.onnx"


def variant_paths(folder: Path) -> dict[str, Path]:
    from segserve.contracts.card import PRECISIONS

    return {p: variant_path(folder, p) for p in PRECISIONS if variant_path(folder, p).is_file()}


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (a model can be half a gigabyte)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once: a hidden file beside it, then renamed over it, so
    that a server polling the folder sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ValueError(
            f"bad model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), "
            "starting with a letter or digit"
        )
    return name


def version_dir(repository: Path, name: str, version: int) -> Path:
    if version < 1:
        raise ValueError(f"versions count from 1, not {version}")
    return Path(repository) / check_name(name) / str(version)


def walk(repository: Path) -> Iterator[VersionEntry]:
    """Every NAME/VERSION holding a model.onnx, by name then version (as integers).

    Hidden folders (an export's temporary `.name-*`) and versions that are not plain
    positive integers are skipped.
    """
    repository = Path(repository)
    if not repository.is_dir():
        return
    for model_dir in sorted(repository.iterdir()):
        if not model_dir.is_dir() or not NAME_PATTERN.fullmatch(model_dir.name):
            continue
        versions = sorted(
            (int(p.name), p)
            for p in model_dir.iterdir()
            if VERSION_PATTERN.fullmatch(p.name) and p.is_dir() and (p / MODEL_FILE).is_file()
        )
        for version, folder in versions:
            yield VersionEntry(model_dir.name, version, folder)


def versions_of(repository: Path, name: str) -> list[int]:
    return [e.version for e in walk(repository) if e.name == name]


def next_version(repository: Path, name: str) -> int:
    versions = versions_of(repository, name)
    return versions[-1] + 1 if versions else 1


@contextmanager
def publishing(repository: Path, name: str, version: int, force: bool = False) -> Iterator[Path]:
    """A private folder to write a new version into. When the block ends without an error,
    the folder becomes REPO/NAME/VERSION at once (a server polling the repository never sees
    half a version); after an error the repository is as it was. An existing version is
    refused unless `force`."""
    target = version_dir(repository, name, version)
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists; pass --force to overwrite it, or no --version for a new one"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name: walk() skips it while it is being written.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        yield Path(tmp)
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        # mkdtemp makes the folder private (0700); a server running as another user (the
        # images' uid 10001) must be able to read it.
        target.chmod(0o755)
        Path(tmp).mkdir()  # TemporaryDirectory's cleanup must find a folder to remove


def write_version(folder: Path, model: onnx.ModelProto, card: ModelCard) -> Path:
    """model.onnx with the card in its metadata_props, and model.json beside it; returns
    the model's path. (The proto is serialised here: no onnx import needed.)"""
    set_card(model, card)
    path = Path(folder) / MODEL_FILE
    path.write_bytes(model.SerializeToString())
    (Path(folder) / CARD_FILE).write_text(card.to_json())
    return path


def set_card(model: onnx.ModelProto, card: ModelCard) -> None:
    """The card as the model's metadata_props (replacing any there)."""
    del model.metadata_props[:]
    for key, value in card.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
