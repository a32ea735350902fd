"""Packaging promises: compiled modules, stubs and py.typed, README and CI in step."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
from pathlib import Path

import pytest

import palisade_c

ROOT = Path(__file__).resolve().parent.parent
COMPILED = sorted(p.stem for p in (ROOT / "pyx" / "palisade_c").glob("*.pyx"))


@pytest.mark.parametrize("name", COMPILED)
def test_module_is_a_compiled_extension_with_a_stub(name: str) -> None:
    mod = importlib.import_module(f"palisade_c.{name}")
    assert mod.__file__ is not None
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__
    pkg_dir = Path(mod.__file__).parent
    assert (pkg_dir / f"{name}.pyi").is_file(), f"no stub shipped for palisade_c.{name}"


def test_py_typed_is_shipped() -> None:
    assert (Path(palisade_c.__file__).parent / "py.typed").is_file()


def test_record_layer_class_is_compiled() -> None:
    from palisade_c import RecordLayer

    # A cdef class has no instance __dict__ and its methods are not Python functions.
    assert not hasattr(RecordLayer(bytes(32), True, bytes(24)), "__dict__")
    assert type(RecordLayer.seal).__name__ in ("method_descriptor", "cython_function_or_method")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = re.findall(r"^(pip install .*pytest.*)$", readme, re.M)
    assert len(cmds) == 1, "README must name exactly one test command"
    assert cmds[0] in ci.splitlines(), "CI must run the README's test command verbatim"
