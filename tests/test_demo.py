"""``palisade demo`` as a user runs it: a subprocess in an empty directory, no hardware.

At the default 115200 baud the demo's pacing is the point: the handshake cannot beat the
wire time of its bytes, and the summary says how close it came. One run there, with few
messages to keep the suite quick; the fast run checks the rest of the summary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import palisade_c

PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "palisade_c", "demo", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )


def test_demo_at_115200_baud(tmp_path: Path) -> None:
    result = demo(tmp_path, "--messages", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("palisade demo: ") for line in lines)
    assert "115200 baud" in lines[0]
    m = re.search(r"handshake ([\d.]+) s until both sides had keys .* wire time ([\d.]+) s = "
                  r"(\d+) bytes x 10 / 115200 baud; ratio ([\d.]+)", lines[1])
    assert m, lines[1]
    handshake, wire, nbytes, ratio = (float(g) for g in m.groups())
    assert nbytes > 10_000  # a post-quantum handshake
    assert wire == pytest.approx(nbytes * 10 / 115200, abs=0.01)
    # The line is really paced (nothing beats the wire), and we are close to it.
    assert handshake >= 0.95 * wire
    assert ratio < 2.0
    assert "3 of 3 messages echoed" in lines[3]
    assert "rekey epoch 0 -> 1" in lines[4]
    assert "closed cleanly; final epoch 1" in lines[5]
    # Progress went to stderr while the handshake crawled.
    assert "palisade demo: handshake" in result.stderr
    assert list(tmp_path.iterdir()) == []  # keys and line lived in a temporary directory


def test_demo_fast_line(tmp_path: Path) -> None:
    result = demo(tmp_path, "--baud", "1000000", "--messages", "12")
    assert result.returncode == 0, result.stderr
    assert "12 of 12 messages echoed" in result.stdout
    m = re.search(r"bytes client->device (\d+), device->client (\d+)", result.stdout)
    assert m and int(m.group(1)) > 8000 and int(m.group(2)) > 8000


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    result = demo(tmp_path, "--baud", "10")
    assert result.returncode == 2
    assert "--baud" in result.stderr


def test_demo_with_constant_rate_shaping_over_udp_and_the_serial_line(tmp_path: Path) -> None:
    """Mode 2 end to end: UDP to the gateway, then the paced pty line to the device; every
    step of the demo still works and the summary shows the overhead."""
    result = demo(tmp_path, "--baud", "1000000", "--messages", "3", "--shaping", "rate:20:256")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    m = re.search(r"shaping rate:20:256: client sent (\d+) packets, (\d+) bytes for (\d+) bytes "
                  r"of messages \(x[\d.]+\); (\d+) padding bytes, (\d+) dummy packets", lines[5])
    assert m, lines[5]
    packets, nbytes, app, _pad, dummies = (int(g) for g in m.groups())
    assert nbytes == 256 * packets and dummies > 0 and app > 0
    assert "rekey epoch 0 -> 1" in lines[4] and "closed cleanly" in lines[6]

