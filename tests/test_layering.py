"""palisade_c never imports firmware_bridge: that package builds on palisade_c (issue 11)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import palisade_c

PACKAGE = Path(palisade_c.__file__).resolve().parent


def test_no_palisade_c_module_imports_firmware_bridge() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] == "firmware_bridge"]
    assert offenders == []


def test_importing_every_palisade_c_module_loads_no_firmware_bridge() -> None:
    code = (
        "import sys, palisade_c.aio, palisade_c.cli, palisade_c.demo, palisade_c.gateway, "
        "palisade_c.transport.serial, palisade_c.transport.pty, palisade_c.progress; "
        "print(sorted(m for m in sys.modules if m.startswith('firmware_bridge')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_old_names_are_the_moved_modules() -> None:
    import firmware_bridge.gateway
    import firmware_bridge.progress
    import firmware_bridge.pty_link
    import firmware_bridge.serial_link
    import palisade_c.gateway
    import palisade_c.progress
    import palisade_c.transport.pty
    import palisade_c.transport.serial

    assert firmware_bridge.serial_link is palisade_c.transport.serial
    assert firmware_bridge.gateway is palisade_c.gateway
    assert firmware_bridge.pty_link is palisade_c.transport.pty
    assert firmware_bridge.progress is palisade_c.progress
    from firmware_bridge.serial_link import SerialTransport

    assert SerialTransport is palisade_c.transport.serial.SerialTransport
