"""Serial link codec (firmware_bridge/c/pal_link.c through palisade_c.link; PROFILE §10, LINK.md).

Oracles: the ``cobs`` package from PyPI for COBS, ``zlib.crc32`` for the CRC, and a reference
decoder written here in a different shape from the C one (split the stream at every 0x00 and
judge each piece whole, instead of a byte-driven state machine). The C test harness is compiled
and run too, once per CRC implementation, and pal_link.c is compiled with the strict flags
for the host and, when the cross compiler is there, for a Cortex-M0.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cobs import cobs as cobs_oracle  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palisade_c import link
from palisade_c.errors import ConfigError, DecodeError, PacketTooLargeError

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "firmware_bridge" / "c"
LINK_MD = ROOT / "firmware_bridge" / "LINK.md"
STRICT = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]
CRC_OPTIONS = ["", "PAL_LINK_CRC_TABLE_FREE", "PAL_LINK_CRC_BYTE_TABLE", "PAL_LINK_CRC_SLICE8"]
COUNTERS = ("crc_errors", "oversize", "cobs_errors", "short_frames")
GOOD_RESIDUE = 0x2144DF1C  # zlib.crc32(body || crc32(body) LE) for every body

Frame = tuple[int, bytes]


# --- oracles ----------------------------------------------------------------------------------


def oracle_frame(channel: int, payload: bytes) -> bytes:
    body = bytes([channel]) + payload
    return bytes(cobs_oracle.encode(body + struct.pack("<I", zlib.crc32(body)))) + b"\x00"


def _walk(chunk: bytes, cap: int) -> tuple[str, bytes]:
    """Decode one delimiter-free piece: ("ok", body), ("oversize", b"") or ("truncated", b"")."""
    out = bytearray()
    i = 0
    prev = None
    while i < len(chunk):
        code = chunk[i]
        i += 1
        if prev is not None and prev != 0xFF:
            if len(out) == cap:
                return "oversize", b""
            out.append(0)
        lit = chunk[i : i + code - 1]
        if len(out) + len(lit) > cap:
            return "oversize", b""
        out += lit
        i += len(lit)
        if len(lit) < code - 1:
            return "truncated", b""
        prev = code
    return "ok", bytes(out)


def reference_decode(stream: bytes, max_payload: int) -> tuple[list[Frame], dict[str, int]]:
    """Frames and error counters a correct decoder reports after reading ``stream``."""
    cap = max_payload + link.FRAME_OVERHEAD
    frames: list[Frame] = []
    counts = dict.fromkeys(COUNTERS, 0)
    *complete, tail = stream.split(b"\x00")
    for chunk in complete:
        if not chunk:
            continue  # idle fill between delimiters
        verdict, body = _walk(chunk, cap)
        if verdict == "oversize":
            counts["oversize"] += 1
        elif verdict == "truncated":
            counts["cobs_errors"] += 1
        elif len(body) < link.FRAME_OVERHEAD:
            counts["short_frames"] += 1
        elif zlib.crc32(body) != GOOD_RESIDUE:
            counts["crc_errors"] += 1
        else:
            assert cobs_oracle.decode(chunk) == body  # the oracle agrees on every good frame
            frames.append((body[0], body[1:-4]))
    # An unfinished frame has no verdict yet, except that overflowing is noticed at once.
    if tail and _walk(tail, cap)[0] == "oversize":
        counts["oversize"] += 1
    return frames, counts


def feed_in_pieces(dec: link.FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    out: list[Frame] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += dec.feed(data[start:cut])
        start = cut
    out += dec.feed(data[start:])
    return out


def counters(dec: link.FrameDecoder) -> dict[str, int]:
    return {name: getattr(dec, name) for name in COUNTERS}


# --- LINK.md vectors ---------------------------------------------------------------------------


@dataclass
class Vector:
    kind: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)

    def raw(self, key: str) -> bytes:
        return bytes.fromhex(self.fields[key])

    def num(self, key: str) -> int:
        return int(self.fields[key], 0)


def link_vectors() -> list[Vector]:
    text = LINK_MD.read_text(encoding="utf-8")
    blocks = re.findall(r"^```link-vectors\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 1, "LINK.md must hold exactly one link-vectors block"
    out = []
    for line in blocks[0].splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, name, *rest = line.split()
        out.append(Vector(kind, name, dict(tok.split("=", 1) for tok in rest)))
    return out


VECTORS = link_vectors()


def of_kind(*kinds: str) -> list[Vector]:
    return [v for v in VECTORS if v.kind in kinds]


def test_link_md_has_every_kind_of_vector() -> None:
    kinds = {v.kind for v in VECTORS}
    assert kinds == {"frame", "crc", "hello", "ping", "pong", "badctl", "decode"}
    assert len(of_kind("frame")) >= 6 and len(of_kind("decode")) >= 8


@pytest.mark.parametrize("v", of_kind("frame"), ids=lambda v: v.name)
def test_frame_vector(v: Vector) -> None:
    channel, payload, wire = v.num("channel"), v.raw("payload"), v.raw("wire")
    assert oracle_frame(channel, payload) == wire  # the document itself is right
    assert link.encode_frame(channel, payload) == wire
    exact = link.FrameDecoder(max_payload=len(payload))
    assert exact.feed(wire) == [(channel, payload)]
    if payload:
        small = link.FrameDecoder(max_payload=len(payload) - 1)
        assert small.feed(wire) == [] and small.oversize == 1


@pytest.mark.parametrize("v", of_kind("crc"), ids=lambda v: v.name)
def test_crc_vector(v: Vector) -> None:
    data, want = v.raw("data"), int(v.fields["crc"], 16)
    assert zlib.crc32(data) == want
    assert link.crc32(data) == want


@pytest.mark.parametrize("v", of_kind("hello", "ping", "pong", "badctl"), ids=lambda v: v.name)
def test_control_vector(v: Vector) -> None:
    payload = v.raw("payload")
    if v.kind == "hello":
        fields = (v.num("version"), v.num("mtu"), v.num("boot"))
        assert link.encode_hello(*fields) == payload[:8]
        node = v.raw("node") if "node" in v.fields else None
        if node is not None:
            assert link.encode_hello(*fields, node_id=node) == payload[:16]
        assert link.parse_hello(payload) == (*fields, node)
        assert link.control_type(payload) == link.CTL_HELLO
    elif v.kind in ("ping", "pong"):
        encode = link.encode_ping if v.kind == "ping" else link.encode_pong
        assert encode(v.num("token")) == payload
        assert link.parse_token(payload) == v.num("token")
        want = link.CTL_PING if v.kind == "ping" else link.CTL_PONG
        assert link.control_type(payload) == want
    else:
        parse = link.parse_hello if payload[0] == link.CTL_HELLO else link.parse_token
        message = {"version": "version 0", "mtu": "MTU below", "malformed": "wrong type or too"}
        with pytest.raises(DecodeError, match=message[v.fields["error"]]):
            parse(payload)


@pytest.mark.parametrize("v", of_kind("decode"), ids=lambda v: v.name)
def test_decode_vector(v: Vector) -> None:
    data, max_payload = v.raw("input"), v.num("max_payload")
    want_frames = [
        (int(ch), bytes.fromhex(hx))
        for ch, hx in (item.split(":") for item in v.fields["frames"].split(",") if item)
    ]
    want_counts = {name: v.num(name) for name in COUNTERS}
    assert reference_decode(data, max_payload) == (want_frames, want_counts)
    for step in (1, 2, 3, 7, len(data)):
        dec = link.FrameDecoder(max_payload)
        got = feed_in_pieces(dec, data, list(range(step, len(data), step)))
        assert got == want_frames
        assert counters(dec) == want_counts and dec.frames == len(want_frames)


# --- round trips -------------------------------------------------------------------------------

channels = st.integers(0, 255)
payloads = st.one_of(
    st.binary(max_size=1100),
    st.binary(min_size=240, max_size=800).map(lambda b: b.replace(b"\x00", b"\x01")),  # long runs
    st.lists(st.sampled_from([0, 1, 0xFF]), max_size=600).map(bytes),  # zero-dense
)


@given(channels, payloads)
def test_encode_matches_cobs_and_zlib_and_decodes_back(channel: int, payload: bytes) -> None:
    wire = link.encode_frame(channel, payload)
    assert wire == oracle_frame(channel, payload)
    assert len(wire) <= link.encoded_max(len(payload))
    assert wire.count(0) == 1 and wire[-1] == 0
    assert link.FrameDecoder(max_payload=max(len(payload), 1)).feed(wire) == [(channel, payload)]


@given(st.lists(st.tuples(channels, payloads), max_size=8), st.lists(st.integers(0, 10**6)))
def test_a_stream_of_frames_decodes_in_any_pieces(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(oracle_frame(ch, p) for ch, p in frames)  # the decoder reads the oracle
    dec = link.FrameDecoder(max_payload=1100)
    assert feed_in_pieces(dec, stream, cuts) == frames
    assert dec.frames == len(frames) and counters(dec) == dict.fromkeys(COUNTERS, 0)


@given(st.lists(st.tuples(channels, st.binary(max_size=300)), min_size=1, max_size=4))
def test_byte_at_a_time_equals_bulk(frames: list[Frame]) -> None:
    stream = b"AB\0" + b"".join(link.encode_frame(ch, p) for ch, p in frames) + b"\x07\x00"
    bulk, single = link.FrameDecoder(), link.FrameDecoder()
    got = [f for b in stream for f in single.feed(bytes([b]))]
    assert got == bulk.feed(stream) == frames
    assert single.counters() == bulk.counters()


@settings(max_examples=400)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 10**6), max_size=6), st.integers(0, 300))
def test_random_bytes_match_the_reference_decoder(data: bytes, cuts: list[int], mp: int) -> None:
    dec = link.FrameDecoder(max_payload=mp)
    got = feed_in_pieces(dec, data, cuts)
    want_frames, want_counts = reference_decode(data, mp)
    assert got == want_frames and counters(dec) == want_counts
    assert dec.pending <= mp + link.FRAME_OVERHEAD


# --- damage and resynchronisation --------------------------------------------------------------

mutation = st.tuples(
    st.sampled_from(["flip", "drop", "insert", "garbage"]),
    st.integers(0, 10**6),
    st.integers(0, 7),
    st.binary(min_size=1, max_size=40),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(channels, st.binary(max_size=200)), min_size=2, max_size=10),
    st.dictionaries(st.integers(0, 9), mutation, max_size=4),
    st.lists(st.integers(0, 10**6), max_size=4),
)
def test_damaged_frames_are_dropped_and_the_rest_delivered(
    frames: list[Frame], damage: dict[int, tuple[str, int, int, bytes]], cuts: list[int]
) -> None:
    segments = []
    for i, (ch, p) in enumerate(frames):
        seg = bytearray(link.encode_frame(ch, p))
        if i in damage:
            kind, pos, bit, junk = damage[i]
            at = pos % len(seg)  # every change lands before or on this frame's own delimiter
            if kind == "flip":
                seg[at] ^= 1 << bit
            elif kind == "drop":
                del seg[at]
            elif kind == "insert":
                seg.insert(at, junk[0])
            else:
                seg[at:at] = junk
        segments.append(bytes(seg))
    stream = b"".join(segments)
    dec = link.FrameDecoder(max_payload=200)
    got = feed_in_pieces(dec, stream, cuts)

    assert (got, counters(dec)) == reference_decode(stream, 200)
    assert all(f in frames for f in got)  # only frames that were sent, never garbage
    # A frame arrives whenever its own bytes are intact and the delimiter before it survived.
    intact = [segments[i] == link.encode_frame(*frames[i]) for i in range(len(frames))]
    delimited = [True] + [seg.endswith(b"\0") for seg in segments[:-1]]
    clean = [f for f, ok, d in zip(frames, intact, delimited, strict=True) if ok and d]
    it = iter(got)
    assert all(f in it for f in clean), "a clean frame was lost"  # in order, as a subsequence
    assert dec.pending <= 200 + link.FRAME_OVERHEAD


def test_log_text_between_frames() -> None:
    a, b = link.encode_frame(0, b"one"), link.encode_frame(0, b"two")
    text = b"U-Boot 2024.01 (Jan 01 2024)\r\nDRAM: 64 MiB\r\n"
    # Text flushed with a delimiter costs nothing but a counted error.
    dec = link.FrameDecoder()
    assert dec.feed(a + text + b"\0" + b) == [(0, b"one"), (0, b"two")]
    assert dec.cobs_errors + dec.crc_errors + dec.short_frames == 1
    # Unflushed text swallows the next frame only; the one after it decodes.
    dec = link.FrameDecoder()
    assert dec.feed(a + text + b + b) == [(0, b"one"), (0, b"two")]


def test_oversize_frames_are_dropped_and_memory_stays_bounded() -> None:
    dec = link.FrameDecoder(max_payload=64)
    assert dec.feed(link.encode_frame(0, bytes(65)) + link.encode_frame(0, bytes(64))) == [
        (0, bytes(64))
    ]
    assert dec.oversize == 1
    junk = bytes(range(1, 256)) * 16  # 4 KiB without a single zero
    tracemalloc.start()
    try:
        dec.feed(junk)
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(256):  # 1 MiB of it
            assert dec.feed(junk) == []
            assert dec.pending <= 64 + link.FRAME_OVERHEAD
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096
    assert dec.oversize == 2  # the whole run is one dropped frame
    assert dec.feed(b"\0" + link.encode_frame(1, b"back")) == [(1, b"back")]


def test_short_and_empty_frames() -> None:
    dec = link.FrameDecoder()
    assert dec.feed(b"\0\0\0" + b"\x01\0" + b"\x05abcd\0") == []
    assert dec.short_frames == 2 and sum(counters(dec).values()) == 2


def test_reset_drops_a_partial_frame() -> None:
    wire = link.encode_frame(0, b"payload")
    dec = link.FrameDecoder()
    assert dec.feed(wire[:5]) == [] and dec.pending > 0
    dec.reset()
    assert dec.pending == 0
    assert dec.feed(wire) == [(0, b"payload")]
    assert dec.counters() == {"frames": 1, **dict.fromkeys(COUNTERS, 0)}


# --- API edges ---------------------------------------------------------------------------------


def test_constants() -> None:
    assert (link.CHANNEL_DATA, link.CHANNEL_LOG, link.CHANNEL_CONTROL) == (0, 1, 2)
    assert link.DEFAULT_MTU == 512 and link.MIN_MTU == 64 and link.MAX_PAYLOAD == 65535
    assert link.FrameDecoder().max_payload == link.DEFAULT_MTU
    assert link.encoded_max(512) == 521 and link.encoded_max(0) == 7


def test_encode_frame_accepts_buffers_and_refuses_bad_input() -> None:
    big = bytes(range(256)) * 20  # larger than the stack buffer inside encode_frame
    for data in (b"abc", bytearray(b"abc"), memoryview(b"xabc")[1:], big):
        assert link.encode_frame(1, data) == oracle_frame(1, bytes(data))
    assert link.encode_frame(7, bytes(65535)) == oracle_frame(7, bytes(65535))
    with pytest.raises(PacketTooLargeError):
        link.encode_frame(0, bytes(65536))
    for bad in (-1, 256):
        with pytest.raises(ValueError):
            link.encode_frame(bad, b"")
    with pytest.raises(TypeError):
        link.encode_frame(0, "text")  # type: ignore[arg-type]


def test_decoder_configuration() -> None:
    for bad in (-1, 65536):
        with pytest.raises(ConfigError):
            link.FrameDecoder(bad)
    assert link.FrameDecoder(0).feed(link.encode_frame(2, b"")) == [(2, b"")]
    assert link.FrameDecoder(65535).feed(link.encode_frame(0, bytes(65535))) == [(0, bytes(65535))]


@given(st.integers(1, 255), st.integers(64, 65535), st.integers(0, 2**32 - 1))
def test_hello_round_trip(version: int, mtu: int, boot: int) -> None:
    payload = link.encode_hello(version, mtu, boot)
    assert payload == struct.pack("<BBHI", link.CTL_HELLO, version, mtu, boot)
    assert link.parse_hello(payload + b"later") == link.Hello(version, mtu, boot)


@given(st.integers(1, 255), st.integers(64, 65535), st.integers(0, 2**32 - 1),
       st.binary(min_size=8, max_size=8), st.binary(max_size=8))
def test_hello_with_node_id_round_trip(
    version: int, mtu: int, boot: int, node: bytes, tail: bytes
) -> None:
    payload = link.encode_hello(version, mtu, boot, node_id=node)
    v = max(version, 2)  # the node id field exists from version 2 on (LINK.md §6)
    assert payload == struct.pack("<BBHI", link.CTL_HELLO, v, mtu, boot) + node
    assert link.parse_hello(payload + tail) == link.Hello(v, mtu, boot, node)
    # A HELLO cut short of the node id is a device without one, not an error.
    assert link.parse_hello(payload[:8 + len(tail) % 8]).node_id is None


def test_hello_and_token_errors() -> None:
    for args in (
        (0, 512, 0),
        (256, 512, 0),
        (1, 63, 0),
        (1, 65536, 0),
        (1, 512, -1),
        (1, 512, 2**32),
    ):
        with pytest.raises(ValueError):
            link.encode_hello(*args)
    for node in (b"", bytes(7), bytes(9)):
        with pytest.raises(ValueError):
            link.encode_hello(2, 512, 0, node_id=node)
    for token in (-1, 2**32):
        with pytest.raises(ValueError):
            link.encode_ping(token)
    with pytest.raises(DecodeError):
        link.parse_hello(link.encode_ping(1) + bytes(3))  # long enough, wrong type
    with pytest.raises(DecodeError):
        link.parse_token(link.encode_hello(1, 512, 1))
    with pytest.raises(DecodeError):
        link.control_type(b"")
    assert link.control_type(b"\x99") == 0x99  # unknown types are the caller's to ignore
    assert isinstance(DecodeError("x"), ValueError)


@given(st.integers(0, 2**32 - 1))
def test_ping_pong(token: int) -> None:
    assert link.parse_token(link.encode_ping(token)) == token
    assert link.encode_pong(token) == b"\x03" + token.to_bytes(4, "little")


def test_negotiate_mtu() -> None:
    assert link.negotiate_mtu(512, 128) == 128 == link.negotiate_mtu(128, 512)
    with pytest.raises(ValueError):
        link.negotiate_mtu(512, 63)


@given(st.binary(max_size=3000), st.integers(0, 2**32 - 1))
def test_crc32_matches_zlib(data: bytes, start: int) -> None:
    assert link.crc32(data) == zlib.crc32(data)
    assert link.crc32(data, start) == zlib.crc32(data, start)


# --- the C source itself -----------------------------------------------------------------------


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    return cc


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("option", CRC_OPTIONS, ids=lambda o: o or "default")
def test_c_harness_passes(option: str, tmp_path: Path) -> None:
    cc = _compiler()
    exe = tmp_path / "test_link"
    flags = [*STRICT, "-O2", *([f"-D{option}"] if option else [])]
    build = _run(
        [cc, *flags, str(C_DIR / "test_link.c"), str(C_DIR / "pal_link.c"), "-o", str(exe)],
        tmp_path,
    )
    assert build.returncode == 0, build.stderr
    run = _run([str(exe), str(LINK_MD)], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^\d+ passed, 0 failed$", run.stdout, re.M), run.stdout
    assert f"{len(VECTORS)} vectors read" in run.stdout


def _undefined_symbols(nm: str, obj: Path, cwd: Path) -> set[str]:
    out = _run([nm, "-u", str(obj)], cwd)
    assert out.returncode == 0, out.stderr
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("option", CRC_OPTIONS, ids=lambda o: o or "default")
def test_codec_compiles_strict_on_the_host(option: str, tmp_path: Path) -> None:
    cc = _compiler()
    obj = tmp_path / "pal_link.o"
    flags = [*STRICT, "-O2", *([f"-D{option}"] if option else [])]
    build = _run([cc, *flags, "-c", str(C_DIR / "pal_link.c"), "-o", str(obj)], tmp_path)
    assert build.returncode == 0, build.stderr
    assert build.stderr == ""
    nm = shutil.which("nm")
    if nm is not None:  # nothing from libc but <string.h>
        assert _undefined_symbols(nm, obj, tmp_path) <= {"memcpy", "memchr", "memset"}


@pytest.mark.parametrize("option", ["", "PAL_LINK_CRC_TABLE_FREE"], ids=["default", "table-free"])
def test_codec_compiles_for_cortex_m0(option: str, tmp_path: Path) -> None:
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        pytest.skip("arm-none-eabi-gcc not installed (Debian package gcc-arm-none-eabi)")
    obj = tmp_path / "pal_link.o"
    build = _run(
        [
            cc,
            "-mcpu=cortex-m0",
            "-mthumb",
            *STRICT,
            "-ffreestanding",
            "-Os",
            "-c",
            *([f"-D{option}"] if option else []),
            str(C_DIR / "pal_link.c"),
            "-o",
            str(obj),
        ],
        tmp_path,
    )
    assert build.returncode == 0, build.stderr
    assert build.stderr == ""
    nm = shutil.which("arm-none-eabi-nm")
    if nm is not None:
        # Cortex-M0 has no divide instruction: pal_link_encoded_max() calls the compiler's own
        # helper (libgcc's __aeabi_uidiv), which is not libc and is linked in any bare-metal build.
        used = {s for s in _undefined_symbols(nm, obj, tmp_path) if not s.startswith("__aeabi_")}
        assert used <= {"memcpy", "memchr", "memset"}


def test_codec_includes_nothing_beyond_the_allowed_headers() -> None:
    allowed = {"<stdint.h>", "<stddef.h>", "<string.h>", '"pal_link.h"', '"pal_link_crc_tables.h"'}
    for name in ("pal_link.h", "pal_link.c", "pal_link_crc_tables.h"):
        includes = re.findall(r"^\s*#\s*include\s+(\S+)", (C_DIR / name).read_text(), re.M)
        assert set(includes) <= allowed, name


def test_slice8_tables_follow_their_recurrence() -> None:
    def table0() -> list[int]:
        out = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
            out.append(c)
        return out

    def hex_words(text: str) -> list[int]:
        return [int(w, 16) for w in re.findall(r"0x([0-9A-F]{8})u", text)]

    t0 = table0()
    src = (C_DIR / "pal_link.c").read_text()
    start = src.index("crc_table[256] = {")
    assert hex_words(src[start : src.index("};", start)]) == t0
    tables = [t0]
    for _ in range(7):
        tables.append([(x >> 8) ^ t0[x & 0xFF] for x in tables[-1]])
    want = [word for table in tables[1:] for word in table]
    assert hex_words((C_DIR / "pal_link_crc_tables.h").read_text()) == want
