"""The public API: the names `import pneumoscope` exposes (its __all__), loaded on first access."""
from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import pneumoscope

LAZY = list(pneumoscope._PUBLIC)  # loaded on first access; the others are plain constants of the package


@pytest.mark.parametrize("name", pneumoscope.__all__)
def test_every_public_name_resolves(name):
    assert not isinstance(getattr(pneumoscope, name), types.ModuleType)  # a submodule of that name would shadow it
    assert name in dir(pneumoscope)


@pytest.mark.parametrize("name", LAZY)
def test_a_lazy_name_is_what_its_module_defines(name):
    assert getattr(pneumoscope, name) is getattr(importlib.import_module(pneumoscope._PUBLIC[name]), name)


@pytest.mark.parametrize("name", [name for name in pneumoscope.__all__ if name != "__version__"])
def test_the_docstring_says_what_each_public_name_is(name):
    assert f"\n    {name} " in pneumoscope.__doc__ or f"\n    {name}\n" in pneumoscope.__doc__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'read_dataset_fast'"):
        pneumoscope.read_dataset_fast  # noqa: B018


def test_importing_the_package_imports_nothing_heavy():
    heavy = ("torch", "numpy", "timm", "sklearn", "lightning", "onnxruntime", "openvino", "fastapi")
    code = (f"import sys, pneumoscope; pneumoscope.__all__; dir(pneumoscope); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
