"""The benchmarks: each answers --help, and each reaches pneumoscope through its public API only
(the names `pneumoscope.__all__` lists) or the command line. A new file in benchmarks/ is covered
without being listed here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pneumoscope

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "benchmarks").glob("*.py"))
HELPERS = {"common.py"}  # imported by the benchmarks, not run
BENCHMARKS = [path for path in SOURCES if path.name not in HELPERS]
IMPORTERS = {"__import__", "import_module"}  # importing by a string is importing too


def internal_uses(source: str) -> list[str]:
    """What in `source` reaches past the public API: sys.path changes, imports of a pneumoscope
    submodule (statements or by string), and `pneumoscope.X` or `from pneumoscope import X` with X
    not in pneumoscope.__all__."""
    public = set(pneumoscope.__all__)
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"line {line}: import {a.name}" for a in node.names if a.name.startswith("pneumoscope.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("pneumoscope."):
                found.append(f"line {line}: from {module} import ...")
            elif module == "pneumoscope":
                found += [f"line {line}: from pneumoscope import {a.name}" for a in node.names if a.name not in public]
            elif module == "sys" and any(a.name == "path" for a in node.names):
                found.append(f"line {line}: from sys import path")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "pneumoscope" and node.attr not in public:
                found.append(f"line {line}: pneumoscope.{node.attr}")
            elif node.value.id == "sys" and node.attr == "path":
                found.append(f"line {line}: sys.path")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            target = node.args[0].value
            if name in IMPORTERS and isinstance(target, str) and target.startswith("pneumoscope."):
                found.append(f"line {line}: {name}({target!r})")
    return found


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_a_benchmark_answers_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script.name} "), done.stdout[:200]


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_a_benchmark_uses_the_public_api_only(source):
    assert internal_uses(source.read_text()) == []


@pytest.mark.parametrize("snippet", [
    "import sys\nsys.path.insert(0, 'src')",
    "from sys import path",
    "import pneumoscope.data",
    "from pneumoscope.data import read_dataset",
    "from pneumoscope import _PUBLIC",
    "import pneumoscope\npneumoscope.data.read_dataset('x')",
    "import importlib\nimportlib.import_module('pneumoscope.guard')",
    "__import__('pneumoscope.train')",
])
def test_the_check_finds_each_way_past_the_public_api(snippet):
    assert len(internal_uses(snippet)) == 1


def test_the_public_names_pass_the_check():
    assert internal_uses("import pneumoscope\nfrom pneumoscope import Classifier, read_dataset\n"
                         "pneumoscope.load_bundle('m'); pneumoscope.__version__") == []
