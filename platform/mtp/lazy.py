"""Public names of a package imported on first use (PEP 562), so importing the package is cheap.

``mtp``, ``mtp.decoding`` and ``mtp.evaluation`` re-export names from modules that pull in
torch (the engine, generation); a caller that needs only a light part (a config class, the
sandboxed scorer) must not pay for the rest, e.g. ``jobs/evaluate.py --samples``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(namespace: dict[str, Any], names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for the package whose globals are ``namespace``.

    ``names`` maps each public name to the module that defines it; a name that is the
    package's own submodule (``"reference": "mtp.decoding.reference"``) resolves to that module.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        imported = importlib.import_module(module)
        value = imported if module == f"{package}.{name}" else getattr(imported, name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
