"""Registered-model URIs (``models:/<name>/<version>``, ``models:/<name>@<alias>``), parsed in one place.

Plain Python, so the registry, the serving config and the model card can read a URI
without importing MLflow or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELS = "models:/"


@dataclass(frozen=True)
class ModelRef:
    """A registered model's URI, parsed: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, uri: str) -> "ModelRef | None":
        """None for anything that is not a ``models:/`` URI."""
        if not uri.startswith(MODELS):
            return None
        rest = uri[len(MODELS):].rstrip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            return cls(name, alias=alias)
        name, _, version = rest.partition("/")
        return cls(name, version=version or None)

    def __str__(self) -> str:
        if self.alias:
            return f"{MODELS}{self.name}@{self.alias}"
        return f"{MODELS}{self.name}/{self.version}" if self.version else f"{MODELS}{self.name}"
