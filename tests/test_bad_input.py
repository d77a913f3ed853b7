"""Bad input from the network gets the standard's answer and leaves the daemon serving.

Each test sends one kind of bad input over a raw socket to a running daemon
and checks, byte for byte, what PS3.8 Table 9-10 says comes back:

- before an association (Sta2) an invalid or unexpected PDU is Evt19 / Evt10 …,
  whose action is AA-1: an A-ABORT PDU with source 0 (service-user) and a
  Reason/Diag. of 00H, "sent with a value 00H" (Table 9-26), then ARTIM and close;
- in an established association (Sta6) an invalid PDU is Evt19 and AA-8: an
  A-ABORT with source 2 (service-provider) and the reason the field implies
  (Table 9-26: 1 unrecognized-PDU, 6 invalid-PDU-parameter-value);
- a DIMSE-level error (a command set that does not decode) is the service-user's
  abort (Evt15, AA-1): source 0.

After each case the daemon must still answer a C-ECHO, must not have logged a
traceback, and (for the cases that say so) must have logged the failure once.

The daemon runs with short timers so that the cases that wait for one are quick:
ARTIM 1 s, network (a PDU stalled half way) 0.5 s, DIMSE (idle association) 2 s.
The network timeout is shorter than ARTIM so the two can be told apart.

References
----------
PS3.8 §9.1.5 (ARTIM), §9.2.3 (Table 9-10), §9.3.1 (PDU types), §9.3.8 (Table 9-26);
DESIGN.md, "Principles" (bad input: the standard's answer, one clear log line).
"""

from __future__ import annotations

import re
import os
import socket
import time

import pytest

from dicomagent.ul.pdu import decode_pdu
from nodes import dicomagent_cmd, run
from ulpeer import (RawPeer, a_abort_bytes, associate_rq_bytes, c_echo_rq_bytes, p_data_tf_bytes,
                    split_pdus)

ARTIM = 1.0
NETWORK = 0.5
DIMSE = 2.0

CONFIG = f"""
[agent.timeouts]
artim = {ARTIM}
network = {NETWORK}
dimse = {DIMSE}
"""

#: PS3.8 Table 9-26 / Table 9-10 AA-1: service-user source, Reason/Diag. 00H.
AA_1_ABORT = a_abort_bytes(0, 0)

#: How long to wait for the daemon to close a connection it should close by a timer.
CLOSE_WITHIN = ARTIM + 2.0

#: Largest resident set the daemon may reach after the hostile PDU-lengths (kB).
MAX_RSS_KB = 200 * 1024


@pytest.fixture(scope="module")
def agent(module_agent_factory):
    return module_agent_factory(CONFIG)


@pytest.fixture
def mark(agent):
    """The daemon's log position at the start of the test; checks it serves at the end."""
    position = agent.log_mark()
    yield position
    assert_still_serving(agent)


def assert_still_serving(agent) -> None:
    assert agent.alive(), agent.log()
    result = run(dicomagent_cmd("echo", agent.host, str(agent.port), "--timeout", "5"), 15)
    assert result.returncode == 0, result.stdout + result.stderr + agent.log()
    assert "Traceback" not in agent.log(), agent.log()


def protocol_lines(log: str) -> list[str]:
    """WARNING and ERROR lines of a log excerpt."""
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR) ", line)]


def expect_abort_then_close(peer: RawPeer, expected: bytes, timeout: float = CLOSE_WITHIN):
    """Read until the daemon closes; the stream must be exactly one A-ABORT PDU."""
    received = peer.read_until_close(timeout)
    pdus = split_pdus(received)
    assert [pdu for _, pdu in pdus] == [expected], (
        f"expected A-ABORT {expected.hex(' ')}, got {received.hex(' ') or 'nothing'}")


def established(agent) -> RawPeer:
    """A raw peer with an association in Sta6 on context 1 (Verification)."""
    peer = RawPeer(agent.host, agent.port)
    ac = peer.associate()
    assert [pc.result for pc in ac.presentation_contexts] == [0]
    return peer


# --- before the association: Sta2 -------------------------------------------------------

def test_unknown_pdu_type_before_association(agent, mark):
    """PDU-type 09H in Sta2: Evt19 → AA-1: A-ABORT (source 0), ARTIM, close."""
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes.fromhex("09 00 00000004 00000000"))
        expect_abort_then_close(peer, AA_1_ABORT)


def test_p_data_tf_before_association(agent, mark):
    """P-DATA-TF in Sta2: Evt10 → AA-1."""
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(c_echo_rq_bytes())
        expect_abort_then_close(peer, AA_1_ABORT)


def test_a_release_rq_before_association(agent, mark):
    """A-RELEASE-RQ in Sta2: Evt12 → AA-1."""
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes.fromhex("05 00 00000004 00000000"))
        expect_abort_then_close(peer, AA_1_ABORT)


def test_associate_rq_pdu_length_too_short(agent, mark):
    """PDU-length 10: shorter than the fixed part of an A-ASSOCIATE-RQ → Evt19 → AA-1."""
    rq = bytearray(associate_rq_bytes())
    rq[2:6] = (10).to_bytes(4, "big")
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes(rq))
        expect_abort_then_close(peer, AA_1_ABORT)


def test_associate_rq_pdu_length_too_long(agent, mark):
    """PDU-length 100 bytes past what is sent: the daemon waits for the rest, then gives
    up after the network timeout and closes (Evt15 in Sta2, local extension AA-2: no PDU)."""
    rq = bytearray(associate_rq_bytes())
    rq[2:6] = (len(rq) - 6 + 100).to_bytes(4, "big")
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes(rq))
        assert peer.read_until_close(CLOSE_WITHIN) == b""


def test_associate_rq_pdu_length_huge(agent, mark):
    """PDU-length 0xFFFFFFF0 is not taken into memory: A-ABORT (AA-1) at the header,
    and the megabytes that follow are not kept either."""
    rq = bytearray(associate_rq_bytes())
    rq[2:6] = (0xFFFFFFF0).to_bytes(4, "big")
    before = agent.rss_kb()
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes(rq))
        try:
            chunk = bytes(1 << 20)
            for _ in range(16):
                peer.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass        # the daemon closed first: fine
        try:
            received = peer.read_until_close(CLOSE_WITHIN)
        except ConnectionResetError:
            received = b""
    # The A-ABORT may be lost to a reset if the daemon closed with our bytes unread.
    assert received in (AA_1_ABORT, b""), received.hex(" ")
    after = agent.rss_kb()
    assert after < MAX_RSS_KB, f"RSS {before} kB -> {after} kB"
    assert after - before < 64 * 1024, f"RSS {before} kB -> {after} kB"


def test_associate_rq_item_runs_past_pdu_end(agent, mark):
    """An Application Context Item whose Item-length runs past the PDU: Evt19 in Sta2 →
    AA-1 (source 0, reason 00H: Table 9-26 has no reason for a service-user abort)."""
    rq = bytearray(associate_rq_bytes())
    assert rq[74] == 0x10                       # the Application Context Item comes first
    rq[76:78] = (0x7000).to_bytes(2, "big")     # its Item-length
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes(rq))
        expect_abort_then_close(peer, AA_1_ABORT)


def test_truncated_pdu_then_disconnect(agent, mark):
    """Half an A-ASSOCIATE-RQ, then the peer closes: Evt17 in Sta2 (AA-5), nothing sent."""
    for cut in (3, 40, len(associate_rq_bytes()) - 1):
        with RawPeer(agent.host, agent.port) as peer:
            peer.send(associate_rq_bytes()[:cut])
    time.sleep(0.2)
    assert agent.alive()
    assert not protocol_lines(agent.log_since(mark)), agent.log_since(mark)


def test_silent_peer_closed_after_artim(agent, mark):
    """A peer that connects and sends nothing: ARTIM expires in Sta2 (Evt18 → AA-2)."""
    with RawPeer(agent.host, agent.port) as peer:
        started = time.monotonic()
        assert peer.read_until_close(CLOSE_WITHIN) == b""
        elapsed = time.monotonic() - started
    assert ARTIM * 0.8 <= elapsed <= ARTIM + 1.5, elapsed
    assert "ARTIM timer expired in Sta2" in agent.log_since(mark)


def test_half_pdu_header_before_association(agent, mark):
    """Three bytes of a PDU header, then nothing: closed after the network timeout
    (before ARTIM), without a PDU (Evt15 in Sta2, local extension AA-2)."""
    with RawPeer(agent.host, agent.port) as peer:
        started = time.monotonic()
        peer.send(b"\x01\x00\x00")
        assert peer.read_until_close(CLOSE_WITHIN) == b""
        elapsed = time.monotonic() - started
    assert elapsed <= ARTIM + 1.0, elapsed
    assert "in the middle of a PDU" in agent.log_since(mark)


# --- in an established association: Sta6 ------------------------------------------------------

def test_unknown_pdu_type_after_association(agent, mark):
    """PDU-type 09H in Sta6: Evt19 → AA-8: A-ABORT source 2, reason 1 (unrecognized-PDU)."""
    with established(agent) as peer:
        peer.send(bytes.fromhex("09 00 00000004 00000000"))
        expect_abort_then_close(peer, a_abort_bytes(2, 1))


def test_associate_rq_after_association(agent, mark):
    """A second A-ASSOCIATE-RQ in Sta6: Evt6 → AA-8: A-ABORT source 2, reason 2
    (unexpected-PDU)."""
    with established(agent) as peer:
        peer.send(associate_rq_bytes())
        expect_abort_then_close(peer, a_abort_bytes(2, 2))


def test_pdv_item_longer_than_pdu(agent, mark):
    """A PDV Item-length past the end of its P-DATA-TF: Evt19 → AA-8: source 2,
    reason 6 (invalid-PDU-parameter-value)."""
    pdu = bytearray(c_echo_rq_bytes())
    pdu[6:10] = (len(pdu)).to_bytes(4, "big")           # PDV item-length > PDU-length - 4
    with established(agent) as peer:
        peer.send(bytes(pdu))
        expect_abort_then_close(peer, a_abort_bytes(2, 6))


def test_garbage_command_set(agent, mark):
    """Valid PDV framing around a command set that is not one: the DIMSE layer aborts
    (A-ABORT request, Evt15 → AA-1: source 0)."""
    with established(agent) as peer:
        peer.send(p_data_tf_bytes(1, 0x03, b"\x01\x02\x03 this is not a command set"))
        expect_abort_then_close(peer, AA_1_ABORT)
    assert "invalid command set" in agent.log_since(mark)


def test_command_on_unaccepted_context(agent, mark):
    """A C-ECHO-RQ on presentation context 3, which was never proposed: aborted."""
    with established(agent) as peer:
        peer.send(c_echo_rq_bytes(context_id=3))
        expect_abort_then_close(peer, AA_1_ABORT)


def test_half_pdu_header_in_association(agent, mark):
    """Three bytes of a PDU header in Sta6, then nothing: after the network timeout
    (not the DIMSE idle timeout) the daemon aborts (Evt15 → AA-1)."""
    with established(agent) as peer:
        started = time.monotonic()
        peer.send(b"\x04\x00\x00")
        pdu = peer.read_pdu(timeout=DIMSE)
        elapsed = time.monotonic() - started
        assert pdu == AA_1_ABORT
        assert NETWORK * 0.8 <= elapsed < DIMSE * 0.8, elapsed
        assert peer.read_until_close(CLOSE_WITHIN) == b""
    assert "in the middle of a PDU (Sta6)" in agent.log_since(mark)


def test_echo_on_raw_association_then_idle_timeout(agent, mark):
    """Our own framing is right (a C-ECHO-RSP comes back), and an association left idle
    is aborted after the DIMSE timeout."""
    with established(agent) as peer:
        peer.send(c_echo_rq_bytes(message_id=7))
        rsp = peer.read_pdu()
        assert rsp[0] == 0x04
        (pdv,) = decode_pdu(rsp).pdvs
        assert (pdv.context_id, pdv.message_control_header) == (1, 0x03)
        started = time.monotonic()
        pdu = peer.read_pdu(timeout=DIMSE + 2.0)
        assert pdu == AA_1_ABORT
        assert DIMSE * 0.8 <= time.monotonic() - started <= DIMSE + 1.5
    assert "idle" in agent.log_since(mark)


@pytest.mark.parametrize("state", ["Sta2", "Sta6"])
def test_after_a_abort_the_daemon_waits_artim_for_the_close(agent, mark, state):
    """After the A-ABORT (AA-1 / AA-8) the connection is in Sta13 with ARTIM running:
    Table 9-10 closes it on Evt17 (peer closes) or Evt18 (ARTIM), not on the network
    timeout meant for a PDU that stalls half way (the framing was abandoned, no PDU is
    in progress)."""
    with RawPeer(agent.host, agent.port) as peer:
        if state == "Sta6":
            peer.associate()
        started = time.monotonic()
        peer.send(bytes.fromhex("09 00 00000004 00000000"))
        assert peer.read_pdu()[0] == 0x07
        assert peer.read_until_close(CLOSE_WITHIN) == b""
        elapsed = time.monotonic() - started
    assert ARTIM * 0.9 <= elapsed <= ARTIM + 1.0, (
        f"closed {elapsed:.2f} s after the A-ABORT; log:\n{agent.log_since(mark)}")
    assert "ARTIM timer expired in Sta13" in agent.log_since(mark)


# --- one log line per protocol failure ------------------------------------------------------

def _log_after_close(agent, mark, peer: RawPeer) -> str:
    peer.read_until_close(CLOSE_WITHIN)
    time.sleep(NETWORK + 0.3)        # a late timer of this connection would have fired by now
    return agent.log_since(mark)


def test_one_log_line_for_invalid_pdu_in_association(agent, mark):
    """Exactly one WARNING names the failure: state, and the field (DESIGN.md, STYLE.md)."""
    with established(agent) as peer:
        peer.send(bytes.fromhex("09 00 00000004 00000000"))
        log = _log_after_close(agent, mark, peer)
    lines = protocol_lines(log)
    assert len(lines) == 1, "expected one WARNING line for one invalid PDU:\n" + log
    assert "invalid PDU" in lines[0] and "Sta6" in lines[0] and "PDU-type" in lines[0], lines


def test_one_log_line_for_invalid_pdu_before_association(agent, mark):
    """Sta2: no association, no A-P-ABORT indication, but still one line naming it."""
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(bytes.fromhex("09 00 00000004 00000000"))
        log = _log_after_close(agent, mark, peer)
    lines = protocol_lines(log)
    assert len(lines) == 1, "expected one WARNING line for one invalid PDU:\n" + log
    assert "invalid PDU" in lines[0] and "Sta2" in lines[0] and "PDU-type" in lines[0], lines


# --- many connections ---------------------------------------------------------------------------

def test_many_connections_opened_and_dropped(agent, mark):
    """200 connections: half dropped at once, half after half an A-ASSOCIATE-RQ; then
    no descriptor is left behind."""
    rq = associate_rq_bytes()
    # A few first, so that what the daemon allocates once (lazily) is not counted.
    for _ in range(4):
        socket.create_connection((agent.host, agent.port), timeout=5).close()
    time.sleep(0.5)
    before = agent.fd_count()
    targets_before = fd_targets(agent)
    for i in range(200):
        sock = socket.create_connection((agent.host, agent.port), timeout=5)
        if i % 2:
            sock.sendall(rq[: len(rq) // 2])
        sock.close()
    count = settled_fd_count(agent, before)
    assert count <= before, (before, count, "new:", new_targets(agent, targets_before))


def settled_fd_count(agent, limit: int, within: float = 10.0) -> int:
    """The daemon's descriptor count once it has stayed at or below ``limit`` for half a
    second (the daemon may still be accepting and closing the last connections of a burst,
    so one low sample proves nothing), or the count when ``within`` seconds are up."""
    deadline = time.monotonic() + within
    calm_since = None
    while time.monotonic() < deadline:
        count = agent.fd_count()
        if count > limit:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= 0.5:
            return count
        time.sleep(0.05)
    return agent.fd_count()


def new_targets(agent, before: list[str]) -> list[str]:
    """Descriptor targets the daemon has now that it did not have in ``before``."""
    new = fd_targets(agent)
    for target in before:
        if target in new:
            new.remove(target)
    return new


def fd_targets(agent) -> list[str]:
    """What the daemon's descriptors point to (for the failure message)."""
    directory = f"/proc/{agent.process.pid}/fd"
    targets = []
    for name in os.listdir(directory):
        try:
            targets.append(os.readlink(os.path.join(directory, name)))
        except FileNotFoundError:  # closed while we looked
            pass
    return sorted(targets)


def test_many_associations_aborted_by_the_peer(agent, mark):
    """50 associations that end with a peer A-ABORT PDU, and 50 that the peer just drops."""
    before = agent.fd_count()
    for i in range(100):
        with established(agent) as peer:
            if i % 2:
                peer.send(a_abort_bytes(0, 0))
    count = settled_fd_count(agent, before)
    assert count <= before, (before, count)
