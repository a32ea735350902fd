"""The C device peer's sources: strict host and Cortex-M4 builds, the symbols they need, and
the plain-C harness (vectors, then hostile input under AddressSanitizer and UBSan)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

C_DIR = Path(__file__).resolve().parent.parent / "firmware_bridge" / "c"
STRICT = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]
CORE = ["pal_device.c"]
ALLOWED_LIBC = {"memcpy", "memset", "memcmp", "memmove"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    return cc


def _undefined(nm: str, obj: Path, cwd: Path) -> set[str]:
    out = _run([nm, "-u", str(obj)], cwd)
    assert out.returncode == 0, out.stderr
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


def _only_port_and_mem(symbols: set[str]) -> set[str]:
    return {s for s in symbols if not s.startswith("pal_crypto_") and s not in ALLOWED_LIBC}


def test_core_compiles_strict_on_the_host(tmp_path: Path) -> None:
    cc = _compiler()
    obj = tmp_path / "pal_device.o"
    build = _run([cc, *STRICT, "-O2", "-c", str(C_DIR / "pal_device.c"), "-o", str(obj)],
                 tmp_path)
    assert build.returncode == 0 and build.stderr == "", build.stderr
    nm = shutil.which("nm")
    if nm is not None:
        assert _only_port_and_mem(_undefined(nm, obj, tmp_path)) == set()


def test_core_partially_links_for_cortex_m4_with_only_the_port_and_mem(tmp_path: Path) -> None:
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        pytest.skip("arm-none-eabi-gcc not installed (Debian package gcc-arm-none-eabi)")
    obj = tmp_path / "pal_device.o"
    build = _run([cc, "-mcpu=cortex-m4", "-mthumb", *STRICT, "-ffreestanding", "-Os", "-c",
                  str(C_DIR / "pal_device.c"), "-o", str(obj)], tmp_path)
    assert build.returncode == 0 and build.stderr == "", build.stderr
    linked = tmp_path / "pal_device_r.o"
    link = _run([cc, "-mcpu=cortex-m4", "-mthumb", "-nostdlib", "-r", str(obj), "-o",
                 str(linked)], tmp_path)
    assert link.returncode == 0, link.stderr
    nm = shutil.which("arm-none-eabi-nm")
    if nm is not None:
        assert _only_port_and_mem(_undefined(nm, linked, tmp_path)) == set()


def test_uart_example_compiles_for_cortex_m4(tmp_path: Path) -> None:
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        pytest.skip("arm-none-eabi-gcc not installed (Debian package gcc-arm-none-eabi)")
    build = _run([cc, "-mcpu=cortex-m4", "-mthumb", *STRICT, "-ffreestanding", "-Os", "-c",
                  str(C_DIR / "example_uart_main.c"), "-o", str(tmp_path / "ex.o")], tmp_path)
    assert build.returncode == 0 and build.stderr == "", build.stderr


def test_core_includes_nothing_beyond_the_allowed_headers() -> None:
    for name in ("pal_device.c", "pal_device.h", "pal_crypto.h"):
        text = (C_DIR / name).read_text()
        includes = set(re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, re.M))
        assert includes <= {"stdint.h", "stddef.h", "string.h", "pal_device.h",
                            "pal_crypto.h"}, (name, includes)
        # No malloc, no stdio, and no writable static data (no global mutable state).
        assert not re.search(r"\b(malloc|calloc|realloc|free|printf)\s*\(", text), name
        assert not re.search(r"^static\s+(?!const\b)(?!.*\()[^;]*;", text, re.M), name


def _openssl() -> None:
    if not Path("/usr/include/openssl/evp.h").exists():
        pytest.skip("the C harness's port needs OpenSSL 3 headers (Debian package libssl-dev)")


def _build_harness(tmp_path: Path, *extra: str) -> Path:
    cc = _compiler()
    _openssl()
    exe = tmp_path / "test_device"
    build = _run([cc, *STRICT, *extra, "-DPAL_TEST_REPLAY_PQ", f"-I{C_DIR}",
                  str(C_DIR / "test_device.c"), str(C_DIR / "test_port_openssl.c"),
                  str(C_DIR / "pal_device.c"), "-lcrypto", "-o", str(exe)], tmp_path)
    assert build.returncode == 0, build.stderr
    return exe


def test_c_harness_checks_every_vector(tmp_path: Path) -> None:
    exe = _build_harness(tmp_path, "-O2")
    run = _run([str(exe)], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    m = re.search(r"(\d+) checks passed, 0 failed", run.stdout)
    assert m and int(m.group(1)) >= 25, run.stdout
    assert "skipped" not in run.stdout


def test_c_harness_fuzz_under_asan_and_ubsan(tmp_path: Path) -> None:
    exe = _build_harness(tmp_path, "-O1", "-g", "-fsanitize=address,undefined",
                         "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
    run = _run([str(exe), "--fuzz", "30000"], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr
