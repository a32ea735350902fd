"""Packaging conventions (issue 14): license metadata, one version source, an sdist that
carries what its tests need, the dev extra, stripped wheels, cibuildwheel, and stubs that
stubtest finds in step with the compiled modules."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import palisade_c

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)


def test_license_metadata() -> None:
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]  # PEP 639
    assert "Programming Language :: Python :: 3.13" in PROJECT["classifiers"]
    assert PROJECT["urls"]


def test_one_version_source() -> None:
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "palisade_c.__version__"
    init = (ROOT / "palisade_c" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "[0-9][^"]*"$', init, re.M)  # a literal: read statically
    try:
        installed = importlib.metadata.version("palisade-c")
    except importlib.metadata.PackageNotFoundError:
        return  # an in-place developer build is not installed
    if Path(palisade_c.__file__).resolve().is_relative_to(ROOT):
        return  # imported from the checkout; the installed metadata may be another build
    assert installed == palisade_c.__version__


def test_sdist_manifest_carries_what_the_tests_read() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    for needed in ("graft tests", "graft docs", "graft bench"):
        assert needed in manifest
    assert any(ln.startswith("include ") and ".ci/run" in ln for ln in manifest)
    assert any("LICENSE" in ln for ln in manifest if ln.startswith("include "))


def test_dev_extra_builds_in_place() -> None:
    dev = " ".join(PROJECT["optional-dependencies"]["dev"])
    for requirement in ("Cython", "setuptools", "pytest", "mypy", "prometheus_client"):
        assert requirement in dev
    assert "prometheus_client" in " ".join(PROJECT["optional-dependencies"]["metrics"])


def test_release_builds_strip_debug_info() -> None:
    setup_py = (ROOT / "setup.py").read_text()
    assert '"-g0"' in setup_py and '"-s"' in setup_py
    assert "extra_compile_args=compile_args" in setup_py


def test_cibuildwheel_builds_manylinux_cp311_to_cp313() -> None:
    cibw = PYPROJECT["tool"]["cibuildwheel"]
    assert cibw["build"].split() == ["cp311-*", "cp312-*", "cp313-*"]
    assert "musllinux" in cibw["skip"] and "manylinux" in cibw["manylinux-x86_64-image"]
    assert cibw["test-extras"] == ["test"]


@pytest.mark.skipif(shutil.which("mypy") is None and "mypy" not in sys.modules,
                    reason="mypy (stubtest) is not installed")
def test_stubtest_finds_the_stubs_in_step(tmp_path: Path) -> None:
    pytest.importorskip("mypy.stubtest")
    modules = [f"palisade_c.{p.stem}" for p in sorted((ROOT / "pyx" / "palisade_c")
                                                     .glob("*.pyx"))]
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--ignore-disjoint-bases", "--allowlist",
         str(ROOT / ".ci" / "stubtest-allowlist.txt"), *modules],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    allowlist = [ln for ln in (ROOT / ".ci" / "stubtest-allowlist.txt").read_text()
                 .splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(allowlist) <= 10  # short: generated artefacts only
