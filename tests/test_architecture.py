"""The layering (docs/architecture.md) is a checked contract, not a convention.

``lint-imports`` reads the contracts in pyproject.toml. These tests run it on the project as it
is, and on a copy with one forbidden import planted, to show that the check can fail.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "hrnet_core": "core/hrnet_core",
    "hrnet_build": "build/hrnet_build",
    "hrnet_client": "client/hrnet_client",
    "hrnet_triton": "hrnet_triton",
    "hrnet_loadtest": "loadtest",
}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path, work: Path) -> subprocess.CompletedProcess:
    """lint-imports with ``root``'s contracts on ``root``'s packages, each linked under its import
    name (``loadtest/`` is the package ``hrnet_loadtest``), so that nothing installed is read instead."""
    src = work / "src"
    src.mkdir()
    for package, folder in PACKAGES.items():
        (src / package).symlink_to(root / folder, target_is_directory=True)
    env = {"PYTHONPATH": str(src), "PATH": str(LINT_IMPORTS.parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_packages(dest: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for folder in PACKAGES.values():
        shutil.copytree(
            ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "trivial*")
        )


def test_the_layer_contracts_hold(tmp_path):
    run = _lint_imports(ROOT, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    "module,planted,contract",
    [
        ("build/hrnet_build/export.py", "import hrnet_client.classify", "entry points -> stages -> core"),
        ("core/hrnet_core/parity.py", "import hrnet_build.export", "entry points -> stages -> core"),
        ("build/hrnet_build/repository.py", "from hrnet_build import engine", "the build stages import"),
    ],
    ids=["build-imports-client", "core-imports-build", "stage-imports-sibling-stage"],
)
def test_a_planted_forbidden_import_breaks_the_contract(tmp_path, module, planted, contract):
    copy = tmp_path / "copy"
    copy.mkdir()
    _copy_packages(copy)
    target = copy / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    run = _lint_imports(copy, tmp_path)
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and contract in run.stdout


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGES.values() for p in (ROOT / folder).glob("*.py"))


def test_no_module_is_over_400_lines_and_no_function_over_60():
    too_long = []
    for path in _sources():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}()")
    assert not too_long, "split these: " + "; ".join(too_long)
