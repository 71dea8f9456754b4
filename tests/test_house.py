"""House rules for the package's code: short functions, and ruff's layout and lint
with no `# fmt: skip` escapes."""

import ast
import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "opa_jax"
MAX_FUNCTION_LINES = 100


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _ruff() -> list[str] | None:
    """The command that runs ruff: the interpreter's own environment first, then PATH."""
    beside_python = pathlib.Path(sys.executable).parent / "ruff"
    if beside_python.is_file():
        return [str(beside_python)]
    on_path = shutil.which("ruff")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    return None


def test_no_function_is_over_100_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_fmt_skip():
    marked = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _modules()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: skip" in line
    ]
    assert not marked, f"`# fmt: skip` at {marked}"


@pytest.mark.parametrize(
    "args", [("format", "--check", "opa_jax"), ("check", "opa_jax")], ids=["format", "check"]
)
def test_ruff_is_clean(args):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (not beside the interpreter, on PATH or importable)")
    done = subprocess.run([*ruff, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
