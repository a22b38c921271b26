"""What a batch job reads: INPUT as a folder, a glob or a manifest (CSV or Parquet of paths),
local or any fsspec URL whose filesystem package is installed, turned into items: each
input's id (its path relative to INPUT's root, which names its output too), its location,
and its output's relative path. Listing only: no image is read here."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import PurePosixPath

from segserve.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "input", "uri", "url")  # the first of these a manifest has
OUTPUT_SUFFIX = {"png": ".png", "overlay": "_overlay.png", "json": ".json"}


class InputError(UserError):
    """INPUT names nothing readable, or inputs that cannot each have their own output."""


@dataclass(frozen=True)
class Item:
    id: str  # the input's path relative to INPUT's root (POSIX), unique in the job
    url: str  # where to read it: a local path or an fsspec URL
    output: str  # the output's path relative to the output folder


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot read {url!r}: {exc}") from exc


def _full(fs, path: str) -> str:
    """A path as found by `fs`, back as the URL to open it with."""
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def list_inputs(source: str, fmt: str = "png") -> list[Item]:
    """The items of INPUT, sorted by id. A folder: every image below it; a glob: what it
    matches (ids relative to the part before its first wildcard); a manifest: the paths in
    its `path` column (relative ones relative to the manifest; ids relative to the paths'
    common folder)."""
    fs, path = _fs(source)
    if path.lower().endswith(MANIFEST_SUFFIXES) and fs.isfile(path):
        locations = _manifest_paths(source, fs, path)
        root = _common_folder([_fs(u)[1] for u in locations])
        pairs = [(posixpath.relpath(_fs(u)[1], root), u) for u in locations]
    elif _has_magic(path):
        root = _magic_free_prefix(path)
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        pairs = [(posixpath.relpath(p, root), _full(fs, p)) for p in found]
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = sorted(
            p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES) and not _hidden(p, root)
        )
        pairs = [(posixpath.relpath(p, root), _full(fs, p)) for p in found]
    elif fs.isfile(path):
        pairs = [(posixpath.basename(path), _full(fs, path))]
    else:
        raise InputError(f"{source}: no such folder, file, glob match or manifest")
    if not pairs:
        raise InputError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return items(pairs, fmt)


def items(pairs: list[tuple[str, str]], fmt: str) -> list[Item]:
    """(id, location) pairs as items; InputError when two inputs would share an output (a.jpg
    and a.png in one folder) or an id climbs out of the root."""
    out, taken = [], {}
    for rel, url in sorted(pairs):
        rel = PurePosixPath(rel).as_posix()
        if rel.startswith("../") or rel == ".." or PurePosixPath(rel).is_absolute():
            raise InputError(f"{url}: outside the inputs' common folder")
        output = str(PurePosixPath(rel).with_suffix("")) + OUTPUT_SUFFIX[fmt]
        if output in taken:
            raise InputError(
                f"{taken[output]} and {rel} would both be written to {output}: one output "
                "per input needs their names to differ by more than the extension"
            )
        taken[output] = rel
        out.append(Item(rel, url, output))
    return out


def _manifest_paths(source: str, fs, path: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if path.lower().endswith(".parquet") else pacsv.read_csv(f)
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise InputError(
            f"{source}: a manifest needs a column of paths named one of {PATH_COLUMNS}; it has "
            f"{table.column_names}"
        )
    values = [str(v) for v in table.column(column).to_pylist() if v not in (None, "")]
    base = posixpath.dirname(path)
    located = []
    for value in values:
        if "://" in value or value.startswith("/"):
            located.append(value)
        else:  # relative to the manifest, on its filesystem
            located.append(_full(fs, posixpath.normpath(posixpath.join(base, value))))
    if len(set(located)) != len(located):
        raise InputError(f"{source}: names the same input more than once")
    return located


def _common_folder(paths: list[str]) -> str:
    folders = [posixpath.dirname(p) for p in paths]
    return posixpath.commonpath(folders) if folders else ""


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _magic_free_prefix(path: str) -> str:
    parts = []
    for part in path.split("/"):
        if _has_magic(part):
            break
        parts.append(part)
    return "/".join(parts) or "/"


def _hidden(path: str, root: str) -> bool:
    """Inside a hidden folder or hidden itself (an output folder's temporary files, .git)."""
    return any(part.startswith(".") for part in posixpath.relpath(path, root).split("/"))
