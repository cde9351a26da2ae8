"""Import hygiene (#9 item 4): the CLI's light paths do not import torch, package
``__init__`` s are lazy, the vocabularies are torch-free leaves, and subpackages do not
import each other in a cycle.

The layering rule (docs/architecture.md): a *leaf* module imports nothing from stablestep
(``formulas``, ``errors``, ``telemetry.names``, ``diagnosis.findings``, ...); any module may
import a leaf, and an import of a leaf is not a dependency on the leaf's package.
Everything else forms an acyclic graph of subpackages, counting imports inside functions
too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import stablestep

SRC = Path(stablestep.__file__).parent
HEAVY = ("torch", "numpy", "matplotlib", "pandas", "scipy")


def _fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it must end by printing a JSON dict."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_LOADED = f"import json, sys; print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"


def test_cli_import_and_help_do_not_import_torch_or_numpy():
    code = (
        "import io, contextlib\nfrom stablestep.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'diagnose' in buf.getvalue(), buf.getvalue()\n" + _LOADED
    )
    loaded = _fresh(code)
    assert not any(loaded.values()), f"stablestep --help imported {loaded}"


def test_diagnose_of_a_csv_does_not_import_torch(tmp_path):
    csv = tmp_path / "small.csv"
    csv.write_text("step,loss\n" + "".join(f"{i},{2.0 - 0.01 * i}\n" for i in range(30))
                   + "30,40.0\n31,1.7\n")
    code = (
        "import io, contextlib, sys\nfrom stablestep.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n    rc = main(['diagnose', sys.argv[1]])\n"
        "assert rc == 0, rc\n" + _LOADED
    )
    loaded = _fresh(code, str(csv))
    assert not loaded["torch"], "stablestep diagnose small.csv imported torch"
    assert not loaded["matplotlib"]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(p.read_text(encoding="utf-8"))
    return out


MODULES = _modules()


def _imports(tree: ast.Module, *, top_only: bool = False) -> set[str]:
    """The stablestep modules imported in ``tree`` (anywhere, or at module level only).

    ``from a import b`` imports module ``a.b`` when that is a module (the package ``a``'s
    ``__init__`` is lazy, checked below), else ``a``. A string constant naming a module
    counts too (``importlib.import_module``, lazy tables)."""
    found: set[str] = set()
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
        elif not top_only and isinstance(node, ast.Constant) and node.value in MODULES:
            found.add(node.value)  # importlib.import_module("stablestep.x.cli") and lazy tables
    return {m for m in found if m.split(".")[0] == "stablestep"}


IMPORTS = {m: _imports(t) & MODULES.keys() for m, t in MODULES.items()}
LEAVES = {m for m, deps in IMPORTS.items() if not deps}
VOCABULARIES = ("stablestep.formulas", "stablestep.errors", "stablestep.telemetry.names",
                "stablestep.diagnosis.findings", "stablestep._lazy")


def _unit(module: str) -> str:
    """The subpackage (``stablestep.telemetry``) or top-level module a module belongs to."""
    return ".".join(module.split(".")[:2])


def _package_edges() -> dict[str, dict[str, set[str]]]:
    edges: dict[str, dict[str, set[str]]] = {}
    for m, deps in IMPORTS.items():
        for d in deps:
            if d in LEAVES or d == "stablestep" or _unit(d) == _unit(m):
                continue
            edges.setdefault(_unit(m), {}).setdefault(_unit(d), set()).add(f"{m} -> {d}")
    return edges


def _cycles() -> dict[frozenset, list[str]]:
    """Every pair of units that reach each other, with one witness import each way."""
    edges = _package_edges()

    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for b in edges.get(todo.pop(), {}):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    r = {u: reach(u) for u in {_unit(m) for m in MODULES}}
    out = {}
    for a in r:
        for b in r[a]:
            if a < b and a in r[b]:
                out[frozenset((a, b))] = sorted(edges.get(a, {}).get(b, set())
                                                | edges.get(b, {}).get(a, set()))
    return out


def test_no_import_cycles_between_subpackages():
    cycles = _cycles()
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(
        f"{' <-> '.join(sorted(k))}: {w}" for k, w in cycles.items())


def test_the_vocabularies_and_formulas_are_leaves():
    for m in VOCABULARIES:
        assert m in LEAVES, f"{m} imports {IMPORTS[m]}"


# curvature is torch through and through and nothing torch-free imports it: its __init__
# is eager by the lead's choice (57dd2a1); the cycle and import-alone checks still cover it.
EAGER_INITS = {"stablestep.curvature"}


def test_subpackage_inits_import_nothing_but_the_lazy_helper():
    for m, tree in MODULES.items():
        if m in EAGER_INITS or not (SRC.parent / Path(*m.split(".")) / "__init__.py").exists():
            continue
        eager = _imports(tree, top_only=True) - {"stablestep._lazy", "stablestep._lazy.attach"}
        assert not eager, f"{m}/__init__.py imports {sorted(eager)} at import time"


def test_vocabularies_and_cli_import_without_heavy_dependencies():
    names = sorted({*VOCABULARIES, "stablestep", "stablestep.cli"})
    code = f"import importlib\nfor m in {names!r}:\n    importlib.import_module(m)\n{_LOADED}"
    loaded = _fresh(code)
    assert not any(loaded.values()), loaded


def _import_time_imports(tree: ast.Module) -> set[str]:
    """stablestep modules imported when the module runs: everything outside function bodies."""
    found: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imports(ast.Module(body=[node], type_ignores=[]), top_only=True)
        todo.extend(ast.iter_child_nodes(node))
    return found & MODULES.keys()


def test_no_module_imports_itself_back_at_import_time():
    """No cycle among import-time imports, so any module can be imported first, alone.
    (Importing ``a.b`` also runs ``a/__init__``, which imports only ``stablestep._lazy``:
    checked by test_subpackage_inits_import_nothing_but_the_lazy_helper.)"""
    edges = {m: _import_time_imports(t) for m, t in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            assert state.get(d) != 1, "import-time cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])


def test_every_lazy_name_resolves_to_its_definition():
    """Each package's ``__all__`` resolves (the lazy tables point at real names), also
    after the defining submodule was imported on its own: ``curvature.hvp`` stays the
    function, not the module ``curvature/hvp.py`` that Python sets on the package."""
    packages = sorted(m for m in MODULES
                      if (SRC.parent / Path(*m.split(".")) / "__init__.py").exists())
    code = (
        "import importlib, json, types\nwrong = []\n"
        f"for name in {packages!r}:\n"
        "    pkg = importlib.import_module(name)\n"
        "    table = getattr(pkg, '_LAZY', {})\n"
        "    for n in table:\n"
        "        importlib.import_module(table[n])  # the submodule first, on its own\n"
        "    for sub in ['hvp', 'train', 'sweep']:  # submodules named like their function\n"
        "        try:\n            importlib.import_module(f'{name}.{sub}')\n"
        "        except ModuleNotFoundError:\n            pass\n"
        "    for n in pkg.__all__:\n"
        "        if n == '__version__':\n            continue\n"
        "        value = getattr(pkg, n, None)\n"
        "        if n in table:\n"
        "            target = importlib.import_module(table[n])\n"
        "            ok = value is getattr(target, n, target)\n"
        "        else:  # an eager __init__\n"
        "            ok = value is not None and not (isinstance(value, types.ModuleType)\n"
        "                                            and hasattr(value, n))\n"
        "        if not ok:\n"
        "            wrong.append(f'{name}.{n}')\n"
        "print(json.dumps({'wrong': wrong}))"
    )
    assert _fresh(code) == {"wrong": []}
