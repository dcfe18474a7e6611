"""The package's shape (docs/architecture.md): the import-linter contracts in pyproject.toml (one-way
layers, no import cycle at any level, Lightning only in training, a plain-Python core), imports
inside functions only with a stated reason, and what those reasons promise: a prediction never
loads PyTorch or Lightning, and `--help` not even NumPy."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import EXAMPLES, ROOT

PACKAGE = ROOT / "src" / "pneumoscope"


def test_the_import_contracts_hold():
    """In a process of its own: import-linter reconfigures logging in the process that runs it."""
    script = ("import sys\nfrom importlinter.cli import lint_imports\n"
              "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "pyproject.toml")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def function_level_imports(path):
    """(line number, source line) of each import of a pneumoscope module inside a function."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in top and (
                node.level or (node.module or "").startswith("pneumoscope")):
            yield node.lineno, lines[node.lineno - 1], lines[node.lineno - 2]


def test_imports_inside_functions_say_why():
    """Outside the CLI (whose docstring gives its one reason), a function-level import of the
    package's own modules is marked `# lazy: <reason>` (start-up time or an optional dependency),
    on its line or the comment line above: anything else belongs at the top of the module."""
    unexplained = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                   for path in sorted(PACKAGE.rglob("*.py")) if path.name != "cli.py" and path != PACKAGE / "__init__.py"
                   for number, line, above in function_level_imports(path)
                   if "# lazy: " not in line and not above.strip().startswith("# lazy: ")]
    assert not unexplained, "\n".join(unexplained)


def loaded_modules(*args: str) -> set[str]:
    """The top-level modules a `pneumoscope ARGS` process has imported when it finishes."""
    script = ("import sys\nfrom pneumoscope.cli import main\ncode = main(sys.argv[1:])\n"
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())


def test_a_prediction_loads_neither_pytorch_nor_lightning():
    image = str(next((EXAMPLES / "PNEUMONIA").iterdir()))
    for backend in ("onnx", "auto"):
        modules = loaded_modules("predict", image, "--backend", backend, "--format", "csv")
        assert {"numpy", "onnxruntime"} <= modules or "openvino" in modules
        assert not modules & {"torch", "lightning", "timm", "torchvision", "sklearn", "matplotlib"}, backend


def test_help_loads_nothing_heavy():
    """What `--help` loads: building the parser (argparse exits on --help before a module list could print)."""
    script = ("import sys\nfrom pneumoscope.cli import build_parser\nbuild_parser()\n"
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    modules = set(done.stdout.split())
    assert "pneumoscope" in modules and not modules & {"numpy", "torch", "PIL", "onnxruntime", "openvino"}, modules
