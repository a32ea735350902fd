"""Build script: compiles the typed Cython core in pyx/palisade_c/ into the palisade_c package.

The .pyx sources live under pyx/palisade_c/ (not pyx/) so that cross-module ``cimport``s
resolve to the real runtime module names (``palisade_c.epoch`` and so on).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
PYX_DIR = Path("pyx") / "palisade_c"

# Extra C sources compiled into a given extension (the firmware link codec is shared with
# device firmware, so it lives in firmware_bridge/c/ and is compiled in here, not copied).
EXTRA_SOURCES: dict[str, list[str]] = {
    "link": ["firmware_bridge/c/pal_link.c"],
    # The C device peer; its crypto port (pal_crypto_*) is defined in device.pyx.
    "device": ["firmware_bridge/c/pal_device.c"],
}


def strip_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags that keep debug info out of release builds.

    CPython's own CFLAGS carry -g, which makes the extensions several times larger than their
    code (connection.so: 2.7 MB with DWARF, under 0.4 MB without). -g0 after it wins; -s
    strips the symbol table at link time (GNU ld). PALISADE_DEBUG_BUILD=1 keeps both, for
    gdb and perf.
    """
    if os.environ.get("PALISADE_DEBUG_BUILD") or os.name != "posix":
        return [], []
    link = ["-s"] if sys.platform.startswith("linux") else []
    return ["-g0"], link


def extensions() -> list[Extension]:
    # PALISADE_BUILD_ONLY=record,epoch limits an in-place developer build to some modules.
    only = {n for n in os.environ.get("PALISADE_BUILD_ONLY", "").split(",") if n}
    exts = []
    compile_args, link_args = strip_flags()
    for pyx in sorted((HERE / PYX_DIR).glob("*.pyx")):
        name = pyx.stem
        if only and name not in only:
            continue
        sources = [str(PYX_DIR / pyx.name), *EXTRA_SOURCES.get(name, [])]
        exts.append(
            Extension(
                f"palisade_c.{name}",
                sources,
                include_dirs=["firmware_bridge/c"],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        )
    return exts


setup(
    ext_modules=cythonize(
        extensions(),
        include_path=["pyx"],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    ),
)
