"""The package as users receive it: a wheel that holds every module, commands whose --help renders, and
code kept within the limits that keep it readable."""

import ast
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

PACKAGE = REPO / "vgg_dist"
COMMANDS = ["vgg_dist.train", "vgg_dist.evaluate", "vgg_dist.predict", "vgg_dist.bench", "vgg_dist.model",
            "vgg_dist.export", "vgg_dist.bench_export"]
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 6  # `self` and `cls` not counted; a keyword-only dataclass counts as one


def test_a_built_wheel_holds_every_module_and_the_recipes(tmp_path):
    """An editable install finds modules in the source tree, so only a real wheel shows what ships."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheel, = tmp_path.glob("vgg_dist-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(REPO)) for pattern in ("**/*.py", "recipes/*.yaml") for path in PACKAGE.glob(pattern)}
    assert expected and expected <= shipped, sorted(expected - shipped)
    assert {"vgg_dist/data/sources.py", "vgg_dist/training/loop.py", "vgg_dist/store/checkpoint.py",
            "vgg_dist/recipes/fast.yaml"} <= shipped


def _help(module: str) -> tuple[str, str]:
    """(stdout, stderr) of a command's --help, run in this process: each command's main() as its console
    script calls it (a subprocess per command would spend seconds importing torch again)."""
    import contextlib
    import importlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--help"])
    assert exit.value.code in (0, None)
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_renders_its_help(module):
    stdout, stderr = _help(module)
    assert stderr == "", stderr
    assert "usage:" in stdout and "{'option_strings'" not in stdout and "%(" not in stdout


def test_the_module_form_renders_help_too():
    """`python -m vgg_dist.train --help` as a user types it, once."""
    result = subprocess.run([sys.executable, "-m", "vgg_dist.train", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stderr == "" and "usage:" in result.stdout


def test_train_help_is_grouped_and_holds_no_measured_figures():
    stdout, _ = _help("vgg_dist.train")
    headings = [line[:-1] for line in stdout.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert headings[:1] == ["options"] and set(headings[1:]) == {
        "recipe", "data", "model", "optimisation", "augmentation", "evaluation", "distributed", "checkpoints",
        "output", "speed"}
    for figure in ("% slower", "% faster", "images/s", "examples/sec", "measured"):
        assert figure not in stdout, figure


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node


def test_no_function_is_longer_than_the_limit():
    long = {name: node.end_lineno - node.lineno + 1 for name, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, long


def test_no_function_takes_more_parameters_than_the_limit():
    def count(node):
        arguments = node.args
        names = [a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]]
        return len([name for name in names if name not in ("self", "cls")])
    crowded = {name: count(node) for name, node in _functions() if count(node) > MAX_PARAMETERS}
    assert not crowded, crowded


def test_the_readme_stays_a_page_for_users():
    """Details belong in docs/; the README is what a newcomer reads top to bottom."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
