"""An association we abort ends for every request waiting on it, at once.

When our side aborts (here: the peer's response has a command set that PS3.7
§6.3.1 forbids, an element outside group 0000), a request waiting for its
response must fail then, not at its DIMSE timeout, and the command must exit
with its "aborted" code (5). A raw acceptor plays the misbehaving peer.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from dicomagent.dimse.commands import C_ECHO_RSP, encode_command
from dicomagent.ul.negotiation import AbstractSyntaxSupport, AcceptorPolicy, negotiate
from dicomagent.ul.pdu import A_ASSOCIATE_RQ
from nodes import HOST, dicomagent_cmd, run
from ulpeer import p_data_tf_bytes

VERIFICATION = "1.2.840.10008.1.1"


def _read_pdu(conn: socket.socket) -> bytes:
    header = b""
    while len(header) < 6:
        header += conn.recv(6 - len(header))
    length = struct.unpack(">I", header[2:6])[0]
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return header + body


def _bad_responder(server: socket.socket, seen: list) -> None:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(10)
        rq = A_ASSOCIATE_RQ.decode(memoryview(_read_pdu(conn)))
        policy = AcceptorPolicy(ae_title="BADPEER", abstract_syntaxes={
            VERIFICATION: AbstractSyntaxSupport()})
        conn.sendall(negotiate(rq, policy).ac.encode())
        _read_pdu(conn)                                   # the C-ECHO-RQ
        command = encode_command(C_ECHO_RSP(AffectedSOPClassUID=VERIFICATION,
                                            MessageIDBeingRespondedTo=1, Status=0))
        # (0008,0000) UL 0: an element of group 0008 in a command set.
        command += struct.pack("<HHI", 0x0008, 0x0000, 4) + struct.pack("<I", 0)
        conn.sendall(p_data_tf_bytes(1, 0x03, command))
        try:
            seen.append(_read_pdu(conn)[0])               # what came back: A-ABORT (07H)
        except (OSError, struct.error):
            seen.append(None)


def test_a_request_fails_as_soon_as_we_abort():
    server = socket.socket()
    server.bind((HOST, 0))
    server.listen(1)
    port = server.getsockname()[1]
    seen: list = []
    thread = threading.Thread(target=_bad_responder, args=(server, seen), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = run(dicomagent_cmd("echo", HOST, str(port), "--aec", "BADPEER",
                                    "--timeout", "30"), 60)
        elapsed = time.monotonic() - started
    finally:
        thread.join(10)
        server.close()
    assert result.returncode == 5, result.stdout + result.stderr
    assert elapsed < 10, f"echo took {elapsed:.1f} s: it waited for its timeout"
    assert "invalid command set" in result.stderr or "abort" in result.stderr.lower(), \
        result.stderr
    assert seen == [0x07], seen
