"""The service's layers import one way only (service/__init__.py draws them): front ends
over the pipeline, the pipeline over the groups (runtime, media, batching, settings), all of
them over errors and telemetry. Batching imports nothing from the service at all. Read from
the source with `ast`, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SERVICE = ROOT / "service"
PACKAGE = "segserve.service"

# Lower rank = higher layer; a module may import from its own rank or a higher number.
RANKS = {
    "app": 0,
    "server": 0,
    "predict": 0,
    "web": 1,
    "protocols": 1,
    "pipeline": 2,
    "shadow": 2,
    "limits": 2,
    "intake": 2,
    "runtime": 3,
    "media": 3,
    "batching": 3,
    "settings": 3,
    "errors": 4,
    "auth": 4,
    "telemetry": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE).with_suffix("").parts
    return ".".join([PACKAGE, *(p for p in parts if p != "__init__")])


def layer_of(module: str) -> str:
    """`segserve.service.web.routes.v2` -> `web`."""
    return module.removeprefix(PACKAGE + ".").split(".")[0]


def service_imports(path: Path) -> set[str]:
    """The segserve.service modules a file imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE:
                found |= {f"{PACKAGE}.{a.name}" for a in node.names}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found


MODULES = sorted(p for p in SERVICE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_of_the_service_belongs_to_a_layer():
    unranked = {layer_of(module_name(p)) for p in MODULES} - set(RANKS)
    assert not unranked, f"modules outside every layer: {unranked}; add them to RANKS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICE)))
def test_imports_go_down_the_layers_only(path):
    own = layer_of(module_name(path))
    upward = sorted(m for m in service_imports(path) if RANKS[layer_of(m)] < RANKS[own])
    assert not upward, f"{own} (rank {RANKS[own]}) imports a higher layer: {upward}"


def test_batching_imports_nothing_from_the_rest_of_the_service():
    for path in (SERVICE / "batching").glob("*.py"):
        outside = {m for m in service_imports(path) if layer_of(m) != "batching"}
        assert not outside, f"{path.name} imports {outside}"


def test_the_service_root_holds_only_entry_points_and_the_pipeline():
    top = sorted(p.name for p in SERVICE.glob("*.py"))
    assert len(top) <= 12, top
