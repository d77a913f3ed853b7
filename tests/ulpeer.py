"""A raw-socket DICOM peer for the tests: exact bytes out, exact PDUs back.

The interop and bad-input tests need to send what no well-behaved
association-requestor would (lying PDU-lengths, unknown PDU types, garbage
command sets) and to see the acceptor's answer byte for byte. ``RawPeer``
is a blocking TCP socket with a deadline on every read; the PDUs it reads
back are split by their PS3.8 §9.3.1 header only, so a test can compare the
bytes with what the standard prescribes.

References
----------
PS3.8 §9.3.1 (PDU header), §9.3.4 (A-ASSOCIATE-RJ, Table 9-21), §9.3.5
(P-DATA-TF, Table 9-22), §9.3.8 (A-ABORT, Table 9-26).
"""

from __future__ import annotations

import socket
import struct
import time

from dicomagent.dimse.commands import C_ECHO_RQ, encode_command
from dicomagent.ul.negotiation import ProposedContext, build_associate_rq
from dicomagent.ul.pdu import A_ASSOCIATE_AC, P_DATA_TF, PresentationDataValueItem, decode_pdu
from dicomagent.uids import VERIFICATION

#: PS3.8 §9.3.1: PDU-type, Reserved, PDU-length.
PDU_HEADER = struct.Struct(">BBI")

A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE, P_DATA_TF_TYPE = 0x02, 0x03, 0x04
A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x05, 0x06, 0x07

#: PS3.8 Table 9-24: A-RELEASE-RQ PDU, four reserved bytes.
A_RELEASE_RQ_BYTES = bytes.fromhex("05 00 00000004 00000000")


def a_abort_bytes(source: int, reason: int) -> bytes:
    """PS3.8 Table 9-26: ``07 00 00000004 00 00 source reason``."""
    return bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, source, reason])


def a_associate_rj_bytes(result: int, source: int, reason: int) -> bytes:
    """PS3.8 Table 9-21: ``03 00 00000004 00 result source reason``."""
    return bytes([0x03, 0x00, 0, 0, 0, 4, 0, result, source, reason])


def associate_rq_bytes(calling: str = "RAWPEER", called: str = "DICOMAGENT",
                       abstract_syntaxes=(VERIFICATION,)) -> bytes:
    """An A-ASSOCIATE-RQ proposing one context (IDs 1, 3, 5, ...) per abstract syntax."""
    contexts = [ProposedContext(uid) for uid in abstract_syntaxes]
    return build_associate_rq(calling, called, contexts).encode()


def p_data_tf_bytes(context_id: int, message_control_header: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (PS3.8 §9.3.5, Annex E.2)."""
    return P_DATA_TF((PresentationDataValueItem(context_id, message_control_header, data),)
                     ).encode()


def c_echo_rq_bytes(context_id: int = 1, message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set, whole, in one P-DATA-TF (command + last fragment: 0x03)."""
    command = encode_command(C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=message_id))
    return p_data_tf_bytes(context_id, 0x03, command)


def split_pdus(data: bytes) -> list[tuple[int, bytes]]:
    """Cut a received byte stream into ``(pdu_type, whole_pdu_bytes)`` by PDU-length.

    A trailing piece that is not a whole PDU is returned with type -1.
    """
    pdus = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 6:
            pdus.append((-1, data[offset:]))
            break
        pdu_type, _, length = PDU_HEADER.unpack_from(data, offset)
        end = offset + 6 + length
        if end > len(data):
            pdus.append((-1, data[offset:]))
            break
        pdus.append((pdu_type, data[offset:end]))
        offset = end
    return pdus


class PeerClosed(Exception):
    """The other side closed the connection before the expected bytes arrived."""


class RawPeer:
    """One TCP connection to a DICOM acceptor, driven byte by byte."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, count: int, deadline: float) -> bytes:
        chunks = []
        while count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"still waiting for {count} byte(s)")
            self.sock.settimeout(left)
            chunk = self.sock.recv(count)
            if not chunk:
                raise PeerClosed(f"closed with {count} byte(s) still expected; got "
                                 f"{b''.join(chunks).hex(' ')}")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def read_pdu(self, timeout: float = 5.0) -> bytes:
        """The next whole PDU, header included; ``PeerClosed`` or ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        header = self._recv_exact(6, deadline)
        _, _, length = PDU_HEADER.unpack(header)
        if length > 1 << 20:
            raise AssertionError(f"peer sent a PDU of length {length}: {header.hex(' ')}")
        return header + self._recv_exact(length, deadline)

    def read_until_close(self, timeout: float) -> bytes:
        """Everything the other side sends until it closes; ``TimeoutError`` if it doesn't."""
        deadline = time.monotonic() + timeout
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connection still open after {timeout:g} s; received "
                                   f"{b''.join(chunks).hex(' ')!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks)
            except socket.timeout:
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def associate(self, calling: str = "RAWPEER", called: str = "DICOMAGENT",
                  abstract_syntaxes=(VERIFICATION,), timeout: float = 5.0) -> A_ASSOCIATE_AC:
        """Send an A-ASSOCIATE-RQ and return the decoded A-ASSOCIATE-AC (anything else fails)."""
        self.send(associate_rq_bytes(calling, called, abstract_syntaxes))
        pdu = self.read_pdu(timeout)
        assert pdu[0] == A_ASSOCIATE_AC_TYPE, f"expected A-ASSOCIATE-AC, got {pdu.hex(' ')}"
        return decode_pdu(pdu)

    def release(self, timeout: float = 5.0) -> None:
        """A-RELEASE-RQ, expect A-RELEASE-RP, then the acceptor closes (AR-4, ARTIM / Evt17)."""
        self.send(A_RELEASE_RQ_BYTES)
        pdu = self.read_pdu(timeout)
        assert pdu == bytes.fromhex("06 00 00000004 00000000"), pdu.hex(" ")
