"""The layering rules of docs/design.md, checked by walking every module's imports (static, with ``ast``).

A violation names the importing module and what it imported, so the fix is obvious.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"

# package -> packages of this project it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "service.serving": ("service.offline", "service.control", "service.api", "service.cli", "bench"),
    "service.store": ("service.offline", "service.control", "service.serving", "service.api", "service.cli"),
    "service.earlyexit": ("service.api", "service.cli", "service.serving", "service.control", "service.offline",
                          "service.store", "service.backbones", "service.ingest"),
    "service.backbones": ("service.offline", "service.control", "service.serving", "service.api", "service.cli",
                          "service.store"),
    "service.ingest": ("service.offline", "service.control", "service.serving", "service.api", "service.cli"),
    "service.offline": ("service.control", "service.serving", "service.api", "service.cli", "bench"),
    "service.control": ("service.api", "service.cli", "bench"),
}
THIRD_PARTY_ONLY_IN_API = ("fastapi", "starlette")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


MODULES = sorted(SERVICE.rglob("*.py"))


def test_the_error_root_is_a_leaf():
    assert not [i for i in imports_of(SERVICE / "errors.py") if i.startswith("service")]


def test_every_package_is_covered():
    packages = {module_name(p).split(".")[1] for p in MODULES if p.parent != SERVICE}
    assert packages <= {k.split(".")[1] for k in FORBIDDEN} | {"api", "cli"}, packages


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_module_respects_layers(path: Path):
    name = module_name(path)
    bad = []
    for imported in imports_of(path):
        for package, forbidden in FORBIDDEN.items():
            if name == package or name.startswith(package + "."):
                bad += [imported for f in forbidden if imported == f.rstrip(".") or imported.startswith(f)]
        top = imported.split(".")[0]
        if top in THIRD_PARTY_ONLY_IN_API and not name.startswith(("service.api", "service.cli")):
            bad.append(imported)
    assert not bad, f"{name} imports {sorted(set(bad))}: see the layers in docs/design.md"


def test_earlyexit_imports_only_torch_numpy_and_stdlib():
    allowed = {"torch", "numpy", "__future__"}
    import sys

    for path in (SERVICE / "earlyexit").rglob("*.py"):
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top == "service":
                # service.errors is a leaf (no project imports): the one error root every layer derives from
                assert imported.startswith("service.earlyexit") or imported == "service.errors", (path, imported)
                continue
            assert top in allowed or top in sys.stdlib_module_names, (path, imported)


OPTIONAL_BENCH_PACKAGES = {"litserve"}  # the `bench` extra; CI installs `test` only


@pytest.mark.parametrize("package", ["service", "bench"])
def test_every_module_imports(package: str):
    """A module that moved or lost a name breaks at import; ruff does not see that, this does."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    broken = []
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if exc.name not in OPTIONAL_BENCH_PACKAGES:
                broken.append(f"{info.name}: {exc!r}")
        except ImportError as exc:
            broken.append(f"{info.name}: {exc!r}")
    assert not broken, "\n".join(broken)


# -- the split of issue 22 -------------------------------------------------------------------------------

MODE_NAMES = {"cm", "ic_prob", "ic_entropy", "combined"}
MODES_TABLE = SERVICE / "earlyexit" / "modes.py"


def test_the_decision_mode_table_imports_torch_and_the_stdlib_only():
    import sys

    for imported in imports_of(MODES_TABLE):
        top = imported.split(".")[0]
        assert top in {"torch", "__future__"} or top in sys.stdlib_module_names, imported


def _mode_comparisons(path: Path) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``) with a decision-mode name, and dicts keyed by them and indexed."""

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value in MODE_NAMES:
            return True
        if isinstance(node, ast.Name) and node.id == "CM":
            return True
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(named(e) for e in node.elts)

    hits = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare) and (named(node.left) or any(named(c) for c in node.comparators)):
            hits.append(f"{module_name(path)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and any(
                named(k) for k in node.value.keys if k is not None):
            hits.append(f"{module_name(path)}:{node.lineno}: a dict keyed by mode names")
    return hits


def test_no_module_compares_decision_mode_names_outside_the_table():
    """Modes are data (service/earlyexit/modes.py): every other module asks the table, so a new mode is one
    registration, not an edit of every module that branches on a name."""
    hits = [h for p in MODULES if p != MODES_TABLE for h in _mode_comparisons(p)]
    hits += [h for p in sorted((ROOT / "bench").rglob("*.py")) for h in _mode_comparisons(p)]
    assert not hits, "\n".join(hits)


def test_only_the_state_writer_writes_active_json_from_serving():
    """The engine runs inference and holds the snapshot; switches and the compare-and-swap of active.json are
    the state writer's (service/serving/state_writer.py)."""
    writers = []
    for path in (SERVICE / "serving").rglob("*.py"):
        text = path.read_text()
        if "update_active" in text or "write_active" in text:
            writers.append(module_name(path))
    assert writers == ["service.serving.state_writer"], writers
    assert "service.api" not in {i.split(".")[0] + "." + i.split(".")[1] for i in
                                 imports_of(SERVICE / "serving" / "state_writer.py") if i.startswith("service.")}


def test_bundle_listing_is_the_stores_and_the_admin_route_stays_thin():
    engine = (SERVICE / "serving" / "engine.py").read_text()
    assert "json.loads" not in engine and "bundle_summaries" not in engine
    admin = (SERVICE / "api" / "routes" / "admin.py").read_text()
    assert "BaseException" not in admin and "getattr(exc" not in admin and ".reserve(" not in admin
    assert "service.control.recompute" in imports_of(SERVICE / "api" / "routes" / "admin.py")
