#!/usr/bin/env python3
"""Association-rate benchmark: dicomagent beside DCMTK storescp.

Starts ``dicomagent serve`` and a single-process DCMTK ``storescp`` on loopback, then from
one client process opens associations in a row against each: TCP connect, A-ASSOCIATE-RQ
(Verification SOP Class, Implicit VR Little Endian), A-ASSOCIATE-AC, C-ECHO-RQ, C-ECHO-RSP,
A-RELEASE-RQ, A-RELEASE-RP, close. It prints associations per second for each server and the
ratio dicomagent/storescp.

    python3 bench/associations.py [--n 2000] [--rounds 4] [--cpus same|split|any]
                                  [--json FILE] [--only-dcmtk]

The load generator is written from PS3.8 §9.3 and PS3.7 §9.3.5 with ``struct``, independent
of the code under test: every PDU it sends is built once, up front, and it is a plain
blocking socket client. The two servers are measured in alternating rounds, after a warm-up,
so that a change of machine load during the run hits both. ``--only-dcmtk`` aims the
dicomagent slot at the same storescp: an A/A run that checks the client and shows the noise
(the ratio should be close to 1.00). By default the client and both servers are pinned to
one CPU (``--cpus``; see ``cpu_placement``), since placement alone moves the rate by ~2x.

Only the standard library is used. Traffic goes to 127.0.0.1 only.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from _process import BenchError, HOST, ServerProcess, free_port, stop_on_sigterm, storescp_version


VERIFICATION_SOP_CLASS = b"1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT_NAME = b"1.2.840.10008.3.1.1.1"
# A UUID-derived UID (PS3.5 §B.2): needs no registered root.
IMPLEMENTATION_CLASS_UID = ("2.25.%d" % uuid.uuid5(uuid.NAMESPACE_URL, "dicomagent/bench").int).encode()
CALLING_AE_TITLE = "BENCH"
MAXIMUM_LENGTH_RECEIVED = 16384
PRESENTATION_CONTEXT_ID = 1

PDU_HEADER = struct.Struct(">BBI")  # PDU-type, reserved, PDU-length (PS3.8 §9.3.1)
ITEM_HEADER = struct.Struct(">BBH")  # Item-type, reserved, Item-length
PDV_HEADER = struct.Struct(">IBB")  # Item-length, Presentation-context-ID, message control header
ELEMENT_HEADER = struct.Struct("<HHI")  # Implicit VR Little Endian: group, element, length

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

MAX_PDU = 1 << 20  # refuse anything larger: an echo exchange never needs it


# --- PDUs, built once ---------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return ITEM_HEADER.pack(item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")


def build_a_associate_rq(called_ae_title: str) -> bytes:
    """A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2, Table 9-11) proposing Verification / Implicit VR LE."""
    presentation_context = _item(
        0x20,
        struct.pack(">BBBB", PRESENTATION_CONTEXT_ID, 0, 0, 0)
        + _item(0x30, VERIFICATION_SOP_CLASS)
        + _item(0x40, IMPLICIT_VR_LITTLE_ENDIAN),
    )
    user_information = _item(
        0x50,
        _item(0x51, struct.pack(">I", MAXIMUM_LENGTH_RECEIVED)) + _item(0x52, IMPLEMENTATION_CLASS_UID),
    )
    body = (
        struct.pack(">HH", 0x0001, 0)
        + _ae(called_ae_title)
        + _ae(CALLING_AE_TITLE)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT_NAME)
        + presentation_context
        + user_information
    )
    return PDU_HEADER.pack(A_ASSOCIATE_RQ, 0, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    return ELEMENT_HEADER.pack(group, element, len(value)) + value


def build_c_echo_rq_p_data_tf(message_id: int = 1) -> bytes:
    """P-DATA-TF PDU (PS3.8 §9.3.5) carrying one C-ECHO-RQ command set (PS3.7 §9.3.5.1)."""
    uid = VERIFICATION_SOP_CLASS + (b"\0" if len(VERIFICATION_SOP_CLASS) % 2 else b"")
    elements = (
        _element(0x0000, 0x0002, uid)  # AffectedSOPClassUID
        + _element(0x0000, 0x0100, struct.pack("<H", 0x0030))  # CommandField: C-ECHO-RQ
        + _element(0x0000, 0x0110, struct.pack("<H", message_id))  # MessageID
        + _element(0x0000, 0x0800, struct.pack("<H", 0x0101))  # CommandDataSetType: none
    )
    command_set = _element(0x0000, 0x0000, struct.pack("<I", len(elements))) + elements
    pdv = PDV_HEADER.pack(2 + len(command_set), PRESENTATION_CONTEXT_ID, 0x03) + command_set
    return PDU_HEADER.pack(P_DATA_TF, 0, len(pdv)) + pdv


A_RELEASE_RQ = PDU_HEADER.pack(A_RELEASE_RQ_TYPE, 0, 4) + bytes(4)


# --- reading ------------------------------------------------------------------------------


class PDUReader:
    """Reads whole PDUs from a blocking socket: 6-byte header, then PDU-length bytes."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, need: int) -> None:
        buf = self.buf
        while len(buf) < need:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("peer closed the connection")
            buf += chunk

    def read_pdu(self) -> tuple[int, bytes]:
        self._fill(6)
        pdu_type, _, length = PDU_HEADER.unpack_from(self.buf, 0)
        if length > MAX_PDU:
            raise BenchError(f"PDU type 0x{pdu_type:02x} claims length {length}")
        end = 6 + length
        self._fill(end)
        body = bytes(self.buf[6:end])
        del self.buf[:end]
        return pdu_type, body


def _unexpected(pdu_type: int, body: bytes, expected: str) -> BenchError:
    if pdu_type == A_ASSOCIATE_RJ and len(body) >= 4:
        return BenchError(f"A-ASSOCIATE-RJ result={body[1]} source={body[2]} reason={body[3]}")
    if pdu_type == A_ABORT and len(body) >= 4:
        return BenchError(f"A-ABORT source={body[2]} reason={body[3]} (expected {expected})")
    return BenchError(f"PDU type 0x{pdu_type:02x} where {expected} was expected")


def check_a_associate_ac(pdu_type: int, body: bytes) -> None:
    """PS3.8 §9.3.3: presentation context 1 accepted (result 0) with Implicit VR LE."""
    if pdu_type != A_ASSOCIATE_AC:
        raise _unexpected(pdu_type, body, "A-ASSOCIATE-AC")
    offset = 68  # Protocol-version, reserved, 16+16 AE fields (echoed), 32 reserved
    while offset + 4 <= len(body):
        item_type, _, length = ITEM_HEADER.unpack_from(body, offset)
        value = body[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if item_type != 0x21 or len(value) < 4 or value[0] != PRESENTATION_CONTEXT_ID:
            continue
        result = value[2]
        if result != 0:
            raise BenchError(f"presentation context rejected, result/reason {result}")
        if len(value) < 8:
            raise BenchError("accepted presentation context has no transfer syntax sub-item")
        sub_type, _, sub_length = ITEM_HEADER.unpack_from(value, 4)
        transfer_syntax = value[8 : 8 + sub_length].rstrip(b"\0 ")
        if sub_type != 0x40 or transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN:
            raise BenchError(f"accepted with transfer syntax {transfer_syntax!r}")
        return
    raise BenchError("A-ASSOCIATE-AC has no presentation context item for context 1")


def read_command_set(reader: PDUReader) -> bytes:
    """Collect command fragments from P-DATA-TF PDUs until the last one (PS3.8 Annex E.2)."""
    parts: list[bytes] = []
    while True:
        pdu_type, body = reader.read_pdu()
        if pdu_type != P_DATA_TF:
            raise _unexpected(pdu_type, body, "P-DATA-TF")
        offset = 0
        while offset + 6 <= len(body):
            length, _, control = PDV_HEADER.unpack_from(body, offset)
            if length < 2 or offset + 4 + length > len(body):
                raise BenchError(f"PDV item length {length} does not fit its PDU")
            if not control & 0x01:
                raise BenchError("data set fragment where a command was expected")
            parts.append(body[offset + 6 : offset + 4 + length])
            offset += 4 + length
            if control & 0x02:
                return b"".join(parts)


def check_c_echo_rsp(command_set: bytes) -> None:
    """PS3.7 §9.3.5.2: CommandField 0x8030 and Status 0x0000."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command_set):
        group, element, length = ELEMENT_HEADER.unpack_from(command_set, offset)
        offset += 8
        if group == 0x0000:
            fields[element] = command_set[offset : offset + length]
        offset += length
    command_field = fields.get(0x0100)
    status = fields.get(0x0900)
    if command_field is None or struct.unpack("<H", command_field[:2])[0] != 0x8030:
        raise BenchError(f"expected C-ECHO-RSP, got CommandField {command_field!r}")
    if status is None or struct.unpack("<H", status[:2])[0] != 0x0000:
        raise BenchError(f"C-ECHO-RSP Status {status!r}, expected 0x0000")


# --- the client ---------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test."""

    label: str
    ae_title: str
    port: int
    associate_rq: bytes = b""
    rounds: list[tuple[int, float]] = field(default_factory=list)  # (associations, seconds)

    def __post_init__(self) -> None:
        self.associate_rq = build_a_associate_rq(self.ae_title)

    @property
    def associations(self) -> int:
        return sum(n for n, _ in self.rounds)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.rounds)

    @property
    def per_second(self) -> float:
        return self.associations / self.seconds if self.seconds else 0.0


P_DATA_C_ECHO_RQ = build_c_echo_rq_p_data_tf()


def one_association(target: Target, timeout: bytes) -> None:
    """Connect, associate, echo, release, close; raise BenchError on any deviation."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Kernel time-outs keep the socket blocking in Python (no poll() per call) yet stop a
        # hung server from hanging the benchmark: a timed-out recv raises BlockingIOError.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        sock.connect((HOST, target.port))
        reader = PDUReader(sock)
        sock.sendall(target.associate_rq)
        check_a_associate_ac(*reader.read_pdu())
        sock.sendall(P_DATA_C_ECHO_RQ)
        check_c_echo_rsp(read_command_set(reader))
        sock.sendall(A_RELEASE_RQ)
        pdu_type, body = reader.read_pdu()
        if pdu_type != A_RELEASE_RP:
            raise _unexpected(pdu_type, body, "A-RELEASE-RP")
    except BlockingIOError as exc:
        raise BenchError("timed out waiting for the server") from exc
    finally:
        sock.close()


def run_round(target: Target, n: int, timeout: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    for i in range(n):
        try:
            one_association(target, timeout)
        except (BenchError, OSError, struct.error) as exc:
            raise BenchError(f"{target.label}: association {i + 1} of {n}: {exc}") from exc
    return n, time.perf_counter() - start


# --- the servers --------------------------------------------------------------------------


def cpu_placement(mode: str) -> tuple[set[int] | None, set[int] | None]:
    """CPUs for (client, servers).

    The rate of a one-client, one-association-at-a-time benchmark is mostly wake-up latency:
    whether the client and the server share a CPU changes it by nearly 2x on a small VM, and
    left to the scheduler the placement changes from round to round. Pinning makes runs
    comparable. ``same`` (default): everything on one CPU, so each hand-off is a context switch
    and no cross-CPU wake-up; the time per association is then close to the CPU it costs the
    client, the kernel and the server, and runs repeat well. ``split``: the client on the last
    CPU, the servers on the others (like a client on another host; slower and noisier on a
    VM). ``any``: the scheduler decides.
    """
    available = sorted(os.sched_getaffinity(0))
    if mode == "any":
        return None, None
    if mode == "same" or len(available) == 1:
        return {available[0]}, {available[0]}
    return {available[-1]}, set(available[:-1])


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="associations per server (default 2000)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up associations per server (default 200)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for any reply (default 10)")
    p.add_argument(
        "--cpus",
        choices=("same", "split", "any"),
        default="same",
        help="CPU placement: same = client and servers on one CPU (default); "
        "split = client on one CPU, servers on the others; any = no pinning",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument(
        "--only-dcmtk",
        action="store_true",
        help="do not start dicomagent; aim its slot at the same storescp (checks the client)",
    )
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1 or args.warmup < 0 or args.timeout <= 0:
        p.error("--n and --rounds must be positive, --warmup not negative, --timeout positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("storescp") is None:
        print("storescp not found: install the Debian package dcmtk", file=sys.stderr)
        return 2
    stop_on_sigterm()

    timeout = struct.pack("ll", int(args.timeout), int((args.timeout % 1) * 1e6))
    client_cpus, server_cpus = cpu_placement(args.cpus)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="bench-associations-") as tmp:
        workdir = Path(tmp)
        try:
            env = dict(os.environ, TCP_NODELAY="1")  # DCMTK: disable Nagle (else ~40 ms/message)
            scp_port = free_port()
            (workdir / "storescp-out").mkdir()
            servers.append(
                ServerProcess(
                    "storescp",
                    ["storescp", "-aet", "STORESCP", "-od", str(workdir / "storescp-out"), str(scp_port)],
                    scp_port,
                    workdir,
                    env,
                    server_cpus,
                )
            )
            storescp = Target("storescp", "STORESCP", scp_port)
            if args.only_dcmtk:
                dicomagent = Target("storescp (A/A)", "STORESCP", scp_port)
            else:
                da_port = free_port()
                # The checkout this script is in comes first: measure this tree, not an older install.
                repo = str(Path(__file__).resolve().parent.parent)
                da_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
                servers.append(
                    ServerProcess(
                        "dicomagent",
                        [sys.executable, "-m", "dicomagent", "serve", "--host", HOST, "--port", str(da_port),
                         "--data-dir", str(workdir / "dicomagent-data")],
                        da_port,
                        workdir,
                        da_env,
                        server_cpus,
                    )
                )
                dicomagent = Target("dicomagent", "DICOMAGENT", da_port)
            for server in servers:
                server.wait_ready(30.0)

            targets = [dicomagent, storescp]
            for target in targets:
                run_round(target, args.warmup, timeout)
            sizes = [args.n // args.rounds + (1 if i < args.n % args.rounds else 0) for i in range(args.rounds)]
            for i, size in enumerate(sizes):
                if size == 0:
                    continue
                for target in targets if i % 2 == 0 else reversed(targets):
                    target.rounds.append(run_round(target, size, timeout))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            for server in servers:
                print(f"{server.name} log ({server.log_path.name}), last lines:\n{server.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            for server in servers:
                server.stop()

    ratio = dicomagent.per_second / storescp.per_second
    placement = "unpinned" if client_cpus is None else f"client on CPU {sorted(client_cpus)}, servers on {sorted(server_cpus)}"
    print(f"associations on {HOST}, one client, {args.n} per server in {args.rounds} alternating rounds "
          f"after {args.warmup} warm-up; {placement}")
    print(f"{'server':<16} {'AE title':<12} {'assoc':>7} {'seconds':>8} {'assoc/s':>8}  per round")
    for t in targets:
        per_round = " ".join(f"{n / s:.0f}" for n, s in t.rounds)
        print(f"{t.label:<16} {t.ae_title:<12} {t.associations:>7} {t.seconds:>8.3f} {t.per_second:>8.0f}  {per_round}")
    print(f"ratio {dicomagent.label}/storescp: {ratio:.2f}")

    if args.json:
        report = {
            "benchmark": "associations",
            "n": args.n,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "only_dcmtk": args.only_dcmtk,
            "cpus": args.cpus,
            "servers": {
                ("dicomagent" if t is dicomagent else "storescp"): {
                    "label": t.label,
                    "ae_title": t.ae_title,
                    "associations": t.associations,
                    "seconds": round(t.seconds, 6),
                    "associations_per_second": round(t.per_second, 1),
                    "per_round": [round(n / s, 1) for n, s in t.rounds],
                }
                for t in targets
            },
            "ratio_dicomagent_over_storescp": round(ratio, 4),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "storescp": storescp_version(),
            },
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
