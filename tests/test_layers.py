"""The architecture, checked: lower layers never import higher ones.

pni_ray.models is pure torch (features, coreset, MLP, prior, scorer, refiner): it may read configs
but no files, images, bundles or training code. pni_ray.data reads and writes image data sets and
knows no model. pni_ray.geometry (images <-> canvases and maps) is torch-free for the edge runtime.
No module but a command-line one imports the CLI. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pni_ray", "export", "jobs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an (absolute or relative) import statement in `path` names, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _project(imported: set[str], modules: dict[str, set[str]]) -> set[str]:
    """The project's own modules among `imported` (a `from pkg import name` counts only for modules)."""
    return {m for m in imported if m in modules}


# layer prefix -> the project modules it may import (besides its own)
ALLOWED = {
    "pni_ray.models": ("pni_ray.config",),
    "pni_ray.data": ("pni_ray.config", "pni_ray.fileio"),
    "pni_ray.geometry": ("pni_ray.config", "pni_ray.data.images"),
    "pni_ray.config": (),
    "pni_ray.fileio": (),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_only_what_is_below_them(layer):
    modules = _modules()
    members = [m for m in modules if _under(m, layer)]
    assert members, f"no modules under {layer}"
    bad = {}
    for mod in members:
        wrong = sorted(m for m in _project(modules[mod], modules)
                       if not _under(m, layer) and not any(_under(m, ok) for ok in ALLOWED[layer])
                       and m not in ("pni_ray",))
        if wrong:
            bad[mod] = wrong
    assert not bad, f"{layer} imports higher layers: {bad}"


def test_geometry_and_the_data_layer_need_no_model_code():
    """The edge runtime imports pni_ray.geometry without torch; data sets load without any model."""
    modules = _modules()
    assert not any(m == "torch" or m.startswith("torch.") for m in modules["pni_ray.geometry"])
    for mod in (m for m in modules if _under(m, "pni_ray.data")):
        assert not any(_under(m, "pni_ray.models") for m in modules[mod]), mod


def test_only_command_line_modules_import_the_cli():
    modules = _modules()
    cli = {m for m in modules if m == "pni_ray.cli" or m.endswith("_cli")}
    assert "pni_ray.cli" in cli and "pni_ray.orchestration.score_cli" in cli
    bad = {mod: sorted(_project(imps, modules) & cli) for mod, imps in modules.items()
           if mod not in cli and _project(imps, modules) & cli}
    assert not bad, f"non-CLI modules import CLI modules: {bad}"


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The rule cannot pass by not looking: a function-local and a relative import are both found."""
    pkg = tmp_path / "pni_ray" / "models"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from pni_ray.training import calibrate\n    from ..data import mvtec\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = _imports(pkg / "x.py")
    assert {"pni_ray.training", "pni_ray.data.mvtec"} <= found
