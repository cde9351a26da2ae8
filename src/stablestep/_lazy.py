"""PEP 562 lazy attributes for package ``__init__`` modules.

Every subpackage ``__init__`` names its public attributes and the module defining each,
and imports nothing: importing ``stablestep.telemetry.names`` or
``stablestep.diagnosis.findings`` must not pull torch, numpy or a sibling subpackage in
(``stablestep --help`` and ``diagnose`` of a CSV stay torch-free; no import cycles).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


class _Package(types.ModuleType):
    """A package whose public attribute may share its name with the submodule defining it
    (``lab.train``, the function in ``lab/train.py``; ``lab.sweep``).

    Importing a submodule makes Python set it as an attribute of its package, which would
    hide the function once anyone imported the submodule; here the function wins, as it
    did when the ``__init__`` imported it eagerly."""

    _lazy_names: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in self._lazy_names and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


def attach(
    package: str, lazy: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for ``package`` resolving ``lazy`` names.

    ``lazy`` maps a public name to the module that defines it. The name resolves to that
    module's attribute of the same name, or, when it has none, to the module itself
    (``"names": "stablestep.telemetry.names"``). Resolved values are cached in
    ``namespace`` (the package's globals).
    """
    names = sorted(lazy)
    module = sys.modules[package]
    module.__class__ = _Package
    module._lazy_names = frozenset(lazy)

    def __getattr__(name: str) -> Any:
        try:
            module_name = lazy[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        target = importlib.import_module(module_name)
        value = getattr(target, name) if hasattr(target, name) else target
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | {k for k in namespace if not k.startswith("_")})

    return __getattr__, __dir__, names
