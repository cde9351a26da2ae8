"""PEP 562 lazy attributes for package ``__init__`` modules.

Every subpackage ``__init__`` names its public attributes and the module defining each,
and imports nothing: importing ``stablestep.telemetry.names`` or
``stablestep.diagnosis.findings`` must not pull torch, numpy or a sibling subpackage in
(``stablestep --help`` and ``diagnose`` of a CSV stay torch-free; no import cycles).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def attach(
    package: str, lazy: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for ``package`` resolving ``lazy`` names.

    ``lazy`` maps a public name to the module that defines it; a name that is the last
    component of its module (``"names": "stablestep.telemetry.names"``) resolves to the
    module itself. Resolved values are cached in ``namespace`` (the package's globals).
    """
    names = sorted(lazy)

    def __getattr__(name: str) -> Any:
        try:
            module_name = lazy[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(module_name)
        value = module if module_name.endswith("." + name) else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | {k for k in namespace if not k.startswith("_")})

    return __getattr__, __dir__, names
