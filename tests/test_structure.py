"""The package's layout: the dependency rule of DESIGN.md ("Layout") and short modules.

The rule lives in pyproject.toml ([tool.importlinter]): cli > api > commands > report >
(deploy | training) > evaluation > data > (config | rundir | io | errors), and only
imgclf.training.engine imports Lightning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import imgclf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(imgclf.__file__).resolve().parent
MAX_LINES = 600


def _lint_imports() -> str:
    """The lint-imports script of the interpreter running the tests (else one on PATH)."""
    for name in ("lint-imports", "lint-imports.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports not found: install the dev extra (pip install -e '.[dev]')")
    return found


def test_import_contracts_are_kept():
    # The package under test, not another checkout that happens to be installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([_lint_imports(), "--no-cache", "--no-logo"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        "an import breaks the layering in pyproject.toml [tool.importlinter]:\n"
        + result.stdout + result.stderr)
    assert "broken" in result.stdout and ", 0 broken" in result.stdout, result.stdout


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by stage): {long}"


def test_public_names_are_the_api_not_submodules():
    import importlib

    for name in ("train", "evaluate", "predict", "load", "mine", "cross_validate"):
        assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir(), name
        assert callable(getattr(imgclf, name)), name
    importlib.import_module("imgclf.deploy.predict")  # once loaded, it must not shadow the API
    assert imgclf.predict is importlib.import_module("imgclf.api").predict
