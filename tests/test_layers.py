"""The architecture, checked: lower layers never import higher ones.

pni_ray.models is pure torch (features, coreset, MLP, prior, scorer, refiner): it may read configs
(and backbone weights) but no images, bundles, data sets or training code. pni_ray.data reads and writes image data sets and
knows no model. pni_ray.geometry (images <-> canvases and maps) is torch-free for the edge runtime.
No module but a command-line one imports the CLI. Every import counts, also those inside functions
and `importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pni_ray",)


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
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _project(imported: set[str], modules: dict[str, set[str]]) -> set[str]:
    """The project's own modules and packages among `imported` (`from pkg import name` counts only
    for modules); packages without an __init__.py (pni_ray.models) count too."""
    packages = {name.rsplit(".", k)[0] for name in modules for k in range(1, name.count(".") + 1)}
    return {m for m in imported if m in modules or m in packages}


# layer prefix -> the project modules it may import (besides its own)
ALLOWED = {
    "pni_ray.models": ("pni_ray.config",),
    "pni_ray.data": ("pni_ray.config", "pni_ray.fileio"),
    "pni_ray.geometry": ("pni_ray.config", "pni_ray.data.images"),
    "pni_ray.config": (),
    "pni_ray.fileio": (),
}


def _violations(layer: str, modules: dict[str, set[str]]) -> dict[str, list[str]]:
    """Modules of `layer` -> the project modules they import that the layer may not."""
    members = [m for m in modules if _under(m, layer)]
    assert members, f"no modules under {layer}"
    bad = {}
    for mod in members:
        wrong = sorted(m for m in _project(modules[mod], modules)
                       if not _under(m, layer) and not any(_under(m, ok) for ok in ALLOWED[layer])
                       and m != "pni_ray")  # the package itself: its __init__ holds only __version__
        if wrong:
            bad[mod] = wrong
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_only_what_is_below_them(layer):
    bad = _violations(layer, _modules())
    assert not bad, f"{layer} imports higher layers: {bad}"


def test_geometry_and_the_data_layer_need_no_model_code():
    """The edge runtime imports pni_ray.geometry without torch; data sets load without any model."""
    modules = _modules()
    assert not any(m == "torch" or m.startswith("torch.") for m in modules["pni_ray.geometry"])
    for mod in (m for m in modules if _under(m, "pni_ray.data")):
        assert not any(_under(m, "pni_ray.models") for m in modules[mod]), mod


def test_only_command_line_modules_import_the_cli():
    modules = _modules()
    cli = {m for m in modules if m in ("pni_ray.cli", "pni_ray.__main__") or m.endswith("_cli")}
    assert "pni_ray.cli" in cli and "pni_ray.orchestration.score_cli" in cli
    bad = {mod: sorted(_project(imps, modules) & cli) for mod, imps in modules.items()
           if mod not in cli and _project(imps, modules) & cli}
    assert not bad, f"non-CLI modules import CLI modules: {bad}"


def test_the_checker_flags_what_it_should(tmp_path, monkeypatch):
    """The rule cannot pass by not looking: function-local, relative, aliased and importlib imports of a
    higher layer are all reported, and a clean module is not."""
    root = tmp_path / "pni_ray"
    for name in ("config.py", "training.py", "data/mvtec.py", "models/clean.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("import torch\nfrom pni_ray.config import X\n" if name == "models/clean.py" else "")
    (root / "models" / "x.py").write_text(
        "import importlib\ndef f():\n    from pni_ray.training import calibrate\n    from ..data import mvtec\n"
        "    import pni_ray.training as t\n    importlib.import_module('pni_ray.data.mvtec')\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    modules = {_module_name(p): _imports(p) for p in sorted(root.rglob("*.py"))}
    assert _violations("pni_ray.models", modules) == {
        "pni_ray.models.x": ["pni_ray.data", "pni_ray.data.mvtec", "pni_ray.training"]}
