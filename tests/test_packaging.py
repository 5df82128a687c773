"""The wheel a user installs: one top-level package, every module, the example config, the licence and the command.

A wheel once installed `export` and `jobs` beside `pni_ray`: a user's own `export.py` then broke Ray scoring, and
another distribution's `jobs` package overwrote pni-ray's. Built from a copy of the source tree (its tests, benchmarks
and jobs included, none of which may be packed) without build isolation (no index needed), so the test sees exactly
what pyproject.toml packs.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "build",
                                                             "dist", "*.egg-info", "runs", "demo-output", ".whl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("pni_ray-*.whl")
    return zipfile.ZipFile(wheel)


def test_the_wheel_installs_one_package_with_its_example_config_licence_and_command(tmp_path):
    with build_wheel(tmp_path) as wheel:
        names = set(wheel.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert {n.split("/")[0] for n in names} == {"pni_ray", dist_info}
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pni_ray").rglob("*.py") if "__pycache__" not in p.parts}
        assert modules and modules <= names, sorted(modules - names)
        example = "pni_ray/orchestration/nightly.example.toml"
        assert wheel.read(example).decode() == (ROOT / "jobs" / "nightly.example.toml").read_text()
        assert f"{dist_info}/licenses/LICENSE" in names
        entry_points = configparser.ConfigParser()
        entry_points.read_string(wheel.read(f"{dist_info}/entry_points.txt").decode())
        assert entry_points["console_scripts"]["pni-ray"] == "pni_ray.cli:main"
