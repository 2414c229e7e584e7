"""Recording to pcapng: the writer, the synthetic TCP, the sans-io Recorder, read back
with tshark (what an operator would open the file with)."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from ops_harness import Proxy, echo_once, echo_server, free_port

from tproxy.flow import FlowInfo
from tproxy.record.pcapng import PcapngWriter
from tproxy.record.recorder import Recorder, Recording
from tproxy.record.tcp import Conversation, _checksum_by_words, checksum

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")


def _tshark(*args: str) -> str:
    done = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout


def follow(path: Path, stream: int) -> tuple[bytes, bytes, str, str]:
    """(client->server bytes, server->client bytes, node 0, node 1) of one TCP stream."""
    out = _tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{stream}")
    lines = out.splitlines()
    nodes = [ln.split(": ", 1)[1] for ln in lines if ln.startswith(("Node 0:", "Node 1:"))]
    body = lines[lines.index(next(ln for ln in lines if ln.startswith("Node 1:"))) + 1 :]
    up, down = bytearray(), bytearray()
    for line in body:
        if line.startswith("====="):
            break
        if line.startswith("\t"):
            down += bytes.fromhex(line.strip())
        elif line.strip():
            up += bytes.fromhex(line.strip())
    return bytes(up), bytes(down), nodes[0], nodes[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 300_000)
        out.append(data[i : i + n])
        i += n
    return out


def test_checksum_equals_the_word_by_word_sum() -> None:
    rng = random.Random(5)
    cases = [
        b"",
        b"\0",
        b"\0\0\0",
        b"\xff\xff",
        b"\xff\xff\xff\xff",
        b"\x01",
        b"\xfe\xff\x01\x00",
    ] + [rng.randbytes(rng.randint(1, 1600)) for _ in range(2000)]
    for data in cases:
        assert checksum(data) == _checksum_by_words(data), data


def test_checksum_of_a_packet_with_its_checksum_is_zero() -> None:
    conv = Conversation(("192.0.2.1", 1234), ("198.51.100.2", 80))
    for pkt in [*conv.handshake(), *conv.data(True, b"odd length!")]:
        assert checksum(pkt[:20]) == 0  # IPv4 header
        segment = pkt[20:]
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(segment))
        assert checksum(pseudo + segment) == 0


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (("192.0.2.10", 40000), ("198.51.100.20", 80)),
        (("2001:db8:1::2", 40000), ("2001:db8:2::2", 443)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_tshark_follows_10_mib_to_the_same_bytes(
    tmp_path: Path, client: tuple[str, int], server: tuple[str, int]
) -> None:
    rng = random.Random(7)
    up = rng.randbytes(10 * 2**20)
    down = rng.randbytes(3 * 2**20 + 17)
    path = tmp_path / "flow.pcapng"
    with path.open("wb") as out:
        writer = PcapngWriter(out)
        rec = Recorder(writer, FlowInfo(id=42, client=client, destination=server))
        ups, downs = _chunks(rng, up), _chunks(rng, down)
        while ups or downs:  # interleaved, as a relay would see them
            if ups:
                rec.feed("client", "read", ups.pop(0))
            if downs:
                rec.feed("server", "read", downs.pop(0))
        rec.end("eof")
    got_up, got_down, node0, node1 = follow(path, 0)
    assert _sha(got_up) == _sha(up) and _sha(got_down) == _sha(down)
    fmt = "[{}]:{}" if ":" in client[0] else "{}:{}"
    assert node0 == fmt.format(*client) and node1 == fmt.format(*server)
    # every checksum verifies; every data segment fits the MSS; FIN both ways
    fields = _tshark(
        "-r",
        str(path),
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
        "-T",
        "fields",
        "-e",
        "tcp.checksum.status",
        "-e",
        "tcp.len",
        "-e",
        "tcp.flags.fin",
        "-e",
        "tcp.analysis.flags",
    ).splitlines()
    statuses = {line.split("\t")[0] for line in fields}
    assert statuses == {"1"}, statuses  # 1: good
    assert max(int(line.split("\t")[1]) for line in fields) == (
        1460 if ":" not in client[0] else 1440
    )
    assert sum(line.split("\t")[2] == "1" for line in fields) == 2
    assert not any(line.split("\t")[3] for line in fields)  # no lost/out-of-order segments


def test_changed_bytes_give_two_marked_conversations(tmp_path: Path) -> None:
    path = tmp_path / "flow.pcapng"
    info = FlowInfo(id=9, client=("192.0.2.10", 40000), destination=("198.51.100.20", 80))
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info, ["replace", "label"])
        rec.feed("client", "read", b"GET / HTTP/1.1\r\n\r\n")
        rec.feed("client", "delivered", b"GET /x HTTP/1.1\r\n\r\n")
        rec.feed("server", "read", b"HTTP/1.1 200 OK\r\n\r\n")
        rec.feed("server", "delivered", b"[tproxy] HTTP/1.1 200 OK\r\n\r\n")
        rec.end("reset")
    client_up, client_down, c0, _ = follow(path, 0)
    server_up, server_down, s0, _ = follow(path, 1)
    assert (client_up, client_down) == (
        b"GET / HTTP/1.1\r\n\r\n",
        b"[tproxy] HTTP/1.1 200 OK\r\n\r\n",
    )
    assert (server_up, server_down) == (b"GET /x HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n")
    assert c0 == "192.0.2.10:40000" and s0 != c0
    comments = [
        c
        for c in _tshark("-r", str(path), "-T", "fields", "-e", "frame.comment").splitlines()
        if c.strip()
    ]
    assert any("CLIENT SIDE" in c and "flow 9" in c and "replace, label" in c for c in comments)
    assert any("SERVER SIDE" in c for c in comments)
    assert any("ended: reset" in c for c in comments)
    resets = _tshark(
        "-r", str(path), "-Y", "tcp.flags.reset == 1", "-T", "fields", "-e", "tcp.stream"
    ).split()
    assert sorted(resets) == ["0", "1"]


def test_interceptors_that_changed_nothing_give_one_conversation(tmp_path: Path) -> None:
    path = tmp_path / "flow.pcapng"
    info = FlowInfo(id=2, client=("192.0.2.10", 40000), destination=("198.51.100.20", 80))
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info, ["hexdump"])
        for chunk in (b"abc", b"defg"):
            rec.feed("client", "read", chunk)
            rec.feed("client", "delivered", chunk)
        rec.feed("server", "read", b"xyz")
        rec.feed("server", "delivered", b"xy")
        rec.feed("server", "delivered", b"z")
        rec.end("eof")
    streams = set(_tshark("-r", str(path), "-T", "fields", "-e", "tcp.stream").split())
    assert streams == {"0"}
    assert follow(path, 0)[:2] == (b"abcdefg", b"xyz")
    assert "changed no byte" in _tshark("-r", str(path), "-T", "fields", "-e", "frame.comment")


def test_a_long_unchanged_server_side_is_written_once_held_too_long(tmp_path: Path) -> None:
    path = tmp_path / "flow.pcapng"
    info = FlowInfo(id=2, client=("192.0.2.10", 40000), destination=("198.51.100.20", 80))
    data = random.Random(3).randbytes(5 * 2**20)
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info, ["hexdump"])
        rec.feed("client", "read", data)
        rec.feed("client", "delivered", data)
        rec.end("eof")
    assert follow(path, 1)[0] == data == follow(path, 0)[0]


def test_max_bytes_caps_what_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "flow.pcapng"
    info = FlowInfo(id=1, client=("192.0.2.10", 40000), destination=("198.51.100.20", 80))
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info, max_bytes=5000)
        rec.feed("client", "read", b"a" * 4000)
        rec.feed("server", "read", b"b" * 4000)
        rec.feed("client", "read", b"c" * 4000)
        rec.end("eof")
    up, down, _, _ = follow(path, 0)
    assert up == b"a" * 4000 and down == b"b" * 1000
    comments = _tshark("-r", str(path), "-T", "fields", "-e", "frame.comment")
    assert "recording truncated at 5000 bytes" in comments


def test_mixed_families_and_names_still_make_one_valid_conversation(tmp_path: Path) -> None:
    path = tmp_path / "flow.pcapng"
    info = FlowInfo(
        id=3, client=("127.0.0.1", 5555), destination=("example.test", 443), mode="socks"
    )
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info)
        rec.feed("client", "read", b"hi")
        rec.end("eof")
    up, _, node0, _ = follow(path, 0)
    assert up == b"hi" and node0 == "127.0.0.1:5555"
    info6 = FlowInfo(id=4, client=("127.0.0.1", 5555), destination=("2001:db8::1", 443))
    with path.open("wb") as out:
        rec = Recorder(PcapngWriter(out), info6)
        rec.feed("client", "read", b"hi6")
        rec.end("eof")
    up, _, node0, _ = follow(path, 0)
    assert up == b"hi6" and node0 == "[::ffff:127.0.0.1]:5555"


def test_recording_per_flow_directory_and_shared_file(tmp_path: Path) -> None:
    info = FlowInfo(id=5, client=("192.0.2.1", 1), destination=("198.51.100.1", 2))
    per_flow = Recording(str(tmp_path / "flows"))
    tap = per_flow.tap_for(info, [])
    tap.feed("client", "read", b"x")
    tap.end("eof")
    assert follow(tmp_path / "flows" / "flow-5.pcapng", 0)[0] == b"x"
    shared = Recording(str(tmp_path / "all.pcapng"), worker="w1")
    for fid in (1, 2):
        tap = shared.tap_for(
            FlowInfo(id=fid, client=("192.0.2.1", fid), destination=("198.51.100.1", 2)), []
        )
        tap.feed("client", "read", b"flow%d" % fid)
        tap.end("eof")
    shared.close()
    assert follow(tmp_path / "all.w1.pcapng", 1)[0] == b"flow2"


def test_run_record_writes_what_was_relayed(tmp_path: Path) -> None:
    with echo_server() as echo:
        port = free_port()
        out = tmp_path / "rec"
        proxy = Proxy(
            tmp_path,
            "--mode",
            f"forward:127.0.0.1:{echo}@127.0.0.1:{port}",
            "-i",
            "label",
            "--record",
            str(out),
        )
        try:
            proxy.wait_port(port)
            payload = random.Random(1).randbytes(10 * 2**20)
            reply = echo_once(port, payload, timeout=60)
            assert reply.endswith(payload[-10:]) and reply.startswith(b"[tproxy] ")
            proxy.wait_log(r"flow \d+ end reason=eof")
        finally:
            assert proxy.stop() == 0, proxy.log
    files = list(out.glob("flow-*.pcapng"))
    assert len(files) == 1
    client_up, client_down, _, _ = follow(files[0], 0)
    server_up, server_down, _, _ = follow(files[0], 1)
    sha = _sha(payload)
    assert _sha(client_up) == sha == _sha(server_up)  # label changes only the way back
    assert _sha(server_down) == sha  # the echo server sent back what it got
    assert _sha(client_down) == _sha(reply)  # the client got the labelled bytes
    assert _sha(client_down) != sha
