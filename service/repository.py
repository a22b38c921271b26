"""The model repository as the service sees it: every version of every model, loaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from segserve.contracts.repository import walk
from segserve.service.batcher import Batcher
from segserve.service.engine import Engine
from segserve.service.errors import ServiceError

log = logging.getLogger("segserve.repository")


@dataclass
class LoadedModel:
    name: str
    version: int
    engine: Engine
    batcher: Batcher | None = None
    warmed: bool = False

    @property
    def card(self):
        return self.engine.card


@dataclass
class FailedModel:
    name: str
    version: str
    error: str


@dataclass
class ModelRegistry:
    models: dict[str, dict[int, LoadedModel]] = field(default_factory=dict)
    failed: list[FailedModel] = field(default_factory=list)
    default_name: str | None = None

    @classmethod
    def scan(cls, repository: Path, load_engine) -> ModelRegistry:
        """Load REPO/NAME/VERSION/model.onnx for every name and version; a model that fails
        is logged and listed, and the others still load."""
        registry = cls()
        repository = Path(repository)
        if not repository.is_dir():
            log.error("model repository %s does not exist", repository)
            registry.failed.append(
                FailedModel("*", "*", f"model repository {repository} does not exist")
            )
            return registry
        for entry in walk(repository):
            try:
                engine = load_engine(entry.model_path)
            except Exception as exc:  # any load failure is reported, never fatal
                log.error("could not load %s: %s", entry.model_path, exc)
                registry.failed.append(
                    FailedModel(entry.name, str(entry.version), f"{exc.__class__.__name__}: {exc}")
                )
                continue
            registry.models.setdefault(entry.name, {})[entry.version] = LoadedModel(
                entry.name, entry.version, engine
            )
            log.info(
                "loaded %s v%s (%s, %s)",
                entry.name,
                entry.version,
                engine.card.architecture,
                engine.provider,
            )
        return registry

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def get(self, name: str | None, version: int | None = None) -> LoadedModel:
        name = name or self.default_name
        if name is None:
            raise ServiceError(404, "no model is loaded")
        versions = self.models.get(name)
        if not versions:
            failed = [f for f in self.failed if f.name == name]
            why = f" (it failed to load: {failed[0].error})" if failed else ""
            raise ServiceError(
                404,
                f"unknown model {name!r}{why}; loaded: {', '.join(sorted(self.models)) or 'none'}",
            )
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise ServiceError(
                404, f"model {name!r} has no version {version}; it has {sorted(versions)}"
            )
        return versions[version]
