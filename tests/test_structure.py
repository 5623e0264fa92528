"""The package's layout: the dependency rule of DESIGN.md ("Layout"), short modules, and
"only cli/ prints".

The rule lives in pyproject.toml ([tool.importlinter]): cli > api > commands > report >
(deploy | training) > evaluation > data > (config | rundir | io | errors | progress), and only
imgclf.training.engine imports Lightning.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import imgclf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(imgclf.__file__).resolve().parent
MAX_LINES = 500  # issue 15: no module over ~500 lines


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


# Where a module outside cli/ may print: the torch-free `python -m imgclf.deploy.onnx_predict`
# of the README, a program of its own that must run with numpy, Pillow and onnxruntime alone
# (no typer, no rich), so it cannot live in cli/. {module: functions}
PRINTS_ALLOWED = {"deploy/onnx_predict.py": {"main"}}
# The public API keeps accepting a (deprecated, ignored) console argument.
CONSOLE_ALLOWED = {"api.py"}


def _library_modules():
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        if not rel.startswith("cli/"):
            yield rel, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))


def _outputs(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """(line, what, enclosing top-level function) for each rich import, print() call and
    `console` parameter."""
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = function or node.name
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                if a.arg == "console":
                    found.append((node.lineno, "console parameter", function))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, f"import {a.name}", function) for a in node.names
                         if a.name.split(".")[0] == "rich")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rich":
            found.append((node.lineno, f"from {node.module} import", function))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "print"):
            found.append((node.lineno, "print()", function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_only_cli_prints():
    """Library code logs and returns data: outside cli/ nothing imports rich, calls print() or
    takes a console."""
    bad = []
    for rel, tree in _library_modules():
        for line, what, function in _outputs(tree):
            if what == "print()" and function in PRINTS_ALLOWED.get(rel, ()):
                continue
            if what == "console parameter" and rel in CONSOLE_ALLOWED:
                continue
            bad.append(f"{rel}:{line}: {what}" + (f" in {function}()" if function else ""))
    assert not bad, "library code that prints (log instead; cli/ draws):\n" + "\n".join(bad)


def test_the_print_check_finds_what_it_looks_for():
    tree = ast.parse("import rich.table\nfrom rich import print as p\n"
                     "def f(x, console=None):\n    def g():\n        print(x)\n")
    assert _outputs(tree) == [
        (1, "import rich.table", None), (2, "from rich import", None),
        (3, "console parameter", "f"), (5, "print()", "f")]


def _unexplained_local_imports(source: str) -> list[int]:
    """Lines of imports of imgclf's own modules inside functions without a `# lazy:` reason
    (on the line, or in the comment heading the block of imports it belongs to)."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for imp in ast.walk(node):
            own = (isinstance(imp, ast.ImportFrom) and (imp.module or "").startswith("imgclf")
                   or isinstance(imp, ast.Import) and any(a.name.startswith("imgclf")
                                                          for a in imp.names))
            if not own:
                continue
            k, explained = imp.lineno - 1, "# lazy" in lines[imp.lineno - 1]
            while not explained and k > 0:
                k -= 1
                text = lines[k].strip()
                if text.startswith("#"):
                    explained = "lazy" in text
                elif not (text.startswith(("from ", "import ", ")")) or text.endswith(",")):
                    break
            if not explained:
                found.append(imp.lineno)
    return found


def test_function_local_imports_of_the_package_say_why():
    """A local import of imgclf's own modules is for an optional extra or start-up time, and
    says so (`# lazy: ...`); never to hide an import cycle."""
    bad = [f"{rel}:{line}" for rel, tree in _library_modules()
           for line in _unexplained_local_imports((PACKAGE / rel).read_text())]
    bad += [f"cli/{p.name}:{line}" for p in (PACKAGE / "cli").glob("*.py")
            for line in _unexplained_local_imports(p.read_text())]
    assert not bad, "function-local imports without a '# lazy:' reason:\n" + "\n".join(bad)


def test_the_local_import_check_finds_what_it_looks_for():
    src = ("def f():\n    from imgclf import io\n"
           "def g():\n    # lazy: torch is slow to import\n    from imgclf.deploy import bundle\n"
           "    from imgclf.deploy import predict\n"
           "def h():\n    import json\n    from imgclf.data import cache  # lazy: start-up\n")
    assert _unexplained_local_imports(src) == [2]
