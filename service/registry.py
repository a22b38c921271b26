"""The models being served: every version of every name, each with its engine and batcher."""

from __future__ import annotations

from dataclasses import dataclass, field

from segserve.contracts.card import ModelCard
from segserve.service.batcher import Batcher
from segserve.service.engine import Engine
from segserve.service.errors import ServiceError


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    engine: Engine
    batcher: Batcher
    warmed: bool = False

    @property
    def card(self) -> ModelCard:
        return self.engine.card


@dataclass
class FailedModel:
    name: str
    version: int
    error: str
    mtime: float = 0.0  # of the file that failed: a changed file is tried again


@dataclass
class ModelRegistry:
    models: dict[str, dict[int, ServedModel]] = field(default_factory=dict)
    failed: list[FailedModel] = field(default_factory=list)
    default_name: str | None = None

    def add(self, model: ServedModel) -> None:
        self.models.setdefault(model.name, {})[model.version] = model

    def remove(self, model: ServedModel) -> None:
        versions = self.models.get(model.name, {})
        versions.pop(model.version, None)
        if not versions:
            self.models.pop(model.name, None)

    def has(self, name: str, version: int) -> bool:
        return version in self.models.get(name, {})

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def versions(self, name: str) -> list[int]:
        return sorted(self.models.get(name, {}))

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """A model by name (default: the default model) and version (default: newest)."""
        name = name or self.default_name
        if name is None:
            raise ServiceError(404, "no model is loaded")
        versions = self.models.get(name)
        if not versions:
            failed = any(f.name == name for f in self.failed)
            why = " (it failed to load: see /models)" if failed else ""
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
