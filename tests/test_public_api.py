"""Repo-wide promises: public names resolve, every public function and class has a docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import stablestep


def _modules():
    for info in pkgutil.walk_packages(stablestep.__path__, prefix="stablestep."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        yield info.name


MODULES = sorted(_modules())


def test_public_names_resolve():
    for name in stablestep.__all__:
        assert getattr(stablestep, name) is not None, name


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_function_and_class_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            if not inspect.getdoc(obj):
                missing.append(name)
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if meth_name.startswith("_") or not inspect.isfunction(meth):
                        continue
                    if not inspect.getdoc(meth):
                        missing.append(f"{name}.{meth_name}")
    assert not missing, f"{module_name}: no docstring on {missing}"
