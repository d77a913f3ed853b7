"""Interop with DCMTK: echoscu against our daemon, our echo against storescp.

DCMTK is the reference peer (STYLE.md, "Tests"): what it accepts from us and
what it makes of our answers is the proof that the Upper Layer and DIMSE are
right. The tests also cover, from the outside, what the daemon decides on its
own: transfer syntax choice (seed Table 12 order, ``transfer_syntax_order``),
the A-ASSOCIATE-RJ reasons of PS3.8 Table 9-21, presentation context results
(PS3.8 §9.3.3.2), configuration errors and shutdown.

These tests never skip: a missing DCMTK binary fails them (``nodes.require_binary``).

References
----------
PS3.8 §9.3.3.2 (Table 9-18 results), §9.3.4 (Table 9-21), §9.3.8 (Table 9-26);
PS3.4 Annex A (Verification).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import pytest

from dicomagent.ul.pdu import decode_pdu
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION)
from nodes import dicomagent_cmd, free_port, run
from ulpeer import RawPeer, a_abort_bytes, a_associate_rj_bytes, associate_rq_bytes

TS_FLAGS = {
    "implicit": IMPLICIT_VR_LITTLE_ENDIAN,
    "explicit": EXPLICIT_VR_LITTLE_ENDIAN,
    "big": EXPLICIT_VR_BIG_ENDIAN,
}


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def echo(node, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """``dicomagent echo HOST PORT ARGS...`` against ``node``."""
    return run(dicomagent_cmd("echo", node.host, str(node.port), "--timeout", "5", *args),
               timeout)


def echoscu(node, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """DCMTK ``echoscu ARGS... HOST PORT`` against ``node``."""
    return run(["echoscu", *args, node.host, str(node.port)], timeout)


def success_line(node, ts_uid: str, aec: str = "ANY-SCP") -> str:
    return f"C-ECHO to {aec}@{node.host}:{node.port}: success (transfer syntax {ts_uid})"


@pytest.fixture(scope="module")
def agent(module_agent_factory):
    """One daemon on its embedded defaults, shared by the tests that do not configure it."""
    return module_agent_factory()


# --- DCMTK echoscu -> dicomagent serve ---------------------------------------------------

def test_echoscu_gets_success(agent):
    result = echoscu(agent, "-d", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    assert "Received Echo Response (Success)" in output(result)
    # Our A-ASSOCIATE-AC as DCMTK read it.
    assert "Their Implementation Version Name: DICOMAGENT_" in output(result)


def test_echoscu_three_transfer_syntaxes_in_one_context(agent):
    """``--propose-ts 3``: Implicit, Explicit LE, Explicit BE in one context; seed Table 12
    order puts Explicit VR Big Endian first."""
    result = echoscu(agent, "-d", "--propose-ts", "3", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    assert "Received Echo Response (Success)" in output(result)
    accepted = re.findall(r"Accepted Transfer Syntax: (\S+)", output(result))
    assert accepted == ["=BigEndianExplicit"], output(result)


def test_echoscu_128_presentation_contexts(agent):
    """``--propose-pc 128``: the most one A-ASSOCIATE-RQ can carry; every one is accepted."""
    result = echoscu(agent, "-d", "--propose-pc", "128", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    accepted = re.findall(r"Context ID:\s+(\d+) \(Accepted\)", output(result))
    assert sorted(map(int, accepted)) == list(range(1, 256, 2)), output(result)[-3000:]
    assert "Received Echo Response (Success)" in output(result)


def test_echoscu_repeat_on_one_association(agent):
    mark = agent.log_mark()
    result = echoscu(agent, "-v", "--repeat", "5", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    assert output(result).count("Received Echo Response (Success)") == 5, output(result)
    assert agent.log_since(mark).count("association accepted") == 1


def test_echoscu_abort_is_logged_and_daemon_keeps_serving(agent):
    """echoscu ``--abort`` ends with an A-ABORT PDU (AA-3 on our side): the daemon says so
    in its log and goes on serving."""
    mark = agent.log_mark()
    result = echoscu(agent, "-v", "--abort", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    assert "Aborting Association" in output(result)
    deadline = time.monotonic() + 2.0
    while True:
        log = agent.log_since(mark)
        aborted = [line for line in log.splitlines() if "abort" in line.lower()]
        if aborted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "association accepted" in log
    assert len(aborted) == 1, f"expected one line about the peer's A-ABORT; log:\n{log}"
    assert "ECHOSCU" in aborted[0], aborted
    again = echoscu(agent, "-aec", agent.ae_title)
    assert again.returncode == 0, output(again)


# --- dicomagent echo -> DCMTK storescp ---------------------------------------------------

@pytest.mark.parametrize("flag", ["implicit", "explicit", "big"])
def test_echo_to_storescp_one_transfer_syntax(storescp, flag):
    result = echo(storescp, "--aec", "STORESCP", "--ts", flag)
    assert result.returncode == 0, output(result) + storescp.log()
    assert result.stdout.strip() == success_line(storescp, TS_FLAGS[flag], "STORESCP")


def test_echo_to_storescp_all_three_transfer_syntaxes(storescp):
    result = echo(storescp, "--aec", "STORESCP", "--ts", "implicit", "--ts", "explicit",
                  "--ts", "big", "--repeat", "3")
    assert result.returncode == 0, output(result) + storescp.log()
    chosen = re.fullmatch(r".*: success \(transfer syntax (\S+)\)", result.stdout.strip())
    assert chosen and chosen.group(1) in TS_FLAGS.values(), result.stdout


# --- dicomagent echo -> dicomagent serve ---------------------------------------------------

@pytest.mark.parametrize("flag", ["implicit", "explicit", "big"])
def test_echo_to_agent_one_transfer_syntax(agent, flag):
    result = echo(agent, "--aec", agent.ae_title, "--ts", flag)
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == success_line(agent, TS_FLAGS[flag], agent.ae_title)


def test_echo_to_agent_prefers_big_endian_by_default(agent):
    """Seed Table 12 order: Explicit VR Big Endian, Explicit VR Little Endian, Implicit."""
    result = echo(agent, "--ts", "implicit", "--ts", "explicit", "--ts", "big")
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == success_line(agent, EXPLICIT_VR_BIG_ENDIAN)
    # The default of --ts is the same three.
    result = echo(agent)
    assert result.stdout.strip() == success_line(agent, EXPLICIT_VR_BIG_ENDIAN), output(result)


def test_echo_to_agent_follows_transfer_syntax_order(agent_factory):
    configured = agent_factory(f"""
[agent]
transfer_syntax_order = ["{IMPLICIT_VR_LITTLE_ENDIAN}", "{EXPLICIT_VR_LITTLE_ENDIAN}"]
""")
    result = echo(configured)
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == success_line(configured, IMPLICIT_VR_LITTLE_ENDIAN)
    result = echo(configured, "--ts", "big", "--ts", "explicit")
    assert result.stdout.strip() == success_line(configured, EXPLICIT_VR_LITTLE_ENDIAN)
    # Big Endian alone is outside the order: context result 4, nothing to echo on.
    result = echo(configured, "--ts", "big")
    assert result.returncode == 4, output(result)
    assert "accepted no Verification presentation context" in result.stderr


# --- rejections: PS3.8 Table 9-21 ----------------------------------------------------------

def test_wrong_called_ae_title_rejected(agent_factory):
    agent = agent_factory("[agent]\ncheck_called_aet = true\n")
    result = echoscu(agent, "-d", "-aec", "SOMEONE-ELSE")
    assert result.returncode != 0, output(result)
    assert "Association Rejected" in output(result)
    assert "Reason: Called AE Title Not Recognized" in output(result)

    result = echo(agent, "--aec", "SOMEONE-ELSE")
    assert result.returncode == 4, output(result)
    assert "called-AE-title-not-recognized" in result.stderr
    assert "permanent" in result.stderr

    with RawPeer(agent.host, agent.port) as peer:
        peer.send(associate_rq_bytes(called="SOMEONE-ELSE"))
        # rejected-permanent (1), service-user (1), called-AE-title-not-recognized (7)
        assert peer.read_pdu() == a_associate_rj_bytes(1, 1, 7)

    assert echoscu(agent, "-aec", agent.ae_title).returncode == 0
    assert echo(agent, "--aec", agent.ae_title).returncode == 0
    assert "called-AE-title-not-recognized" in agent.log()


def test_unknown_calling_ae_title_rejected(agent_factory):
    agent = agent_factory("""
[agent]
require_known_calling_aet = true

[peers.modality]
ae_title = "KNOWN"
host = "127.0.0.1"
port = 104

[peers.pacs]
ae_title = "ALSOKNOWN"
host = "127.0.0.1"
port = 105
""")
    result = echoscu(agent, "-d", "-aet", "STRANGER", "-aec", agent.ae_title)
    assert result.returncode != 0, output(result)
    assert "Reason: Calling AE Title Not Recognized" in output(result)

    result = echo(agent, "--aet", "STRANGER")
    assert result.returncode == 4, output(result)
    assert "calling-AE-title-not-recognized" in result.stderr

    with RawPeer(agent.host, agent.port) as peer:
        peer.send(associate_rq_bytes(calling="STRANGER"))
        # rejected-permanent (1), service-user (1), calling-AE-title-not-recognized (3)
        assert peer.read_pdu() == a_associate_rj_bytes(1, 1, 3)

    result = echoscu(agent, "-aet", "KNOWN", "-aec", agent.ae_title)
    assert result.returncode == 0, output(result)
    result = echo(agent, "--aet", "ALSOKNOWN")
    assert result.returncode == 0, output(result)


def test_max_associations_local_limit_exceeded(agent_factory):
    agent = agent_factory("[agent]\nmax_associations = 1\n")
    with RawPeer(agent.host, agent.port) as held:
        ac = held.associate()
        assert [pc.result for pc in ac.presentation_contexts] == [0]

        with RawPeer(agent.host, agent.port) as second:
            second.send(associate_rq_bytes(calling="SECOND"))
            # rejected-transient (2), service-provider presentation (3), local-limit-exceeded (2)
            assert second.read_pdu() == a_associate_rj_bytes(2, 3, 2)

        result = echoscu(agent, "-d", "-aec", agent.ae_title)
        assert result.returncode != 0, output(result)
        assert "Result: Rejected Transient" in output(result)
        assert "Reason: Local Limit Exceeded" in output(result)

        result = echo(agent)
        assert result.returncode == 4, output(result)
        assert "local-limit-exceeded" in result.stderr
        assert "transient" in result.stderr

        held.release()
    # The slot is free again.
    deadline = time.monotonic() + 5
    while (result := echo(agent)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.returncode == 0, output(result)
    assert "max_associations" in agent.log()


# --- presentation context results: PS3.8 §9.3.3.2 ----------------------------------------

def test_unknown_abstract_syntax_gets_result_3(agent):
    unknown = "1.2.826.0.1.3680043.2.1143.999.1"
    with RawPeer(agent.host, agent.port) as peer:
        ac = peer.associate(abstract_syntaxes=(VERIFICATION, unknown))
        results = {pc.context_id: (pc.result, pc.transfer_syntax)
                   for pc in ac.presentation_contexts}
        assert results[1] == (0, EXPLICIT_VR_BIG_ENDIAN)
        assert results[3][0] == 3          # abstract-syntax-not-supported
        peer.release()


def test_associate_ac_bytes_decode_and_echo_ac_fields(agent):
    """The AC answers with the RQ's AE titles and our Implementation Class UID."""
    with RawPeer(agent.host, agent.port) as peer:
        peer.send(associate_rq_bytes(calling="RAWPEER", called="WHATEVER"))
        pdu = peer.read_pdu()
        ac = decode_pdu(pdu)
        assert (ac.called_ae_title, ac.calling_ae_title) == ("WHATEVER", "RAWPEER")
        assert ac.protocol_version & 1
        assert ac.user_information.maximum_length_received is not None
        peer.release()


# --- configuration errors -------------------------------------------------------------------

@pytest.mark.parametrize("toml_text, key", [
    ("[agent]\nae_titel = 'X'\n", "agent.ae_titel"),
    ("[agent.timeouts]\nartim = 'soon'\n", "agent.timeouts.artim"),
    ("[agent.timeouts]\nidle = 5\n", "agent.timeouts.idle"),
    ("[agent]\nport = '104'\n", "agent.port"),
    ("[agent]\ncheck_called_aet = 'yes'\n", "agent.check_called_aet"),
    ("[agent]\ntransfer_syntax_order = '1.2.840.10008.1.2'\n", "agent.transfer_syntax_order"),
    ("[peers.pacs]\nae_title = 'PACS'\nhost = 'pacs'\n", "peers.pacs.port"),
    ("[nonsense]\n", "nonsense"),
])
def test_config_error_names_the_key(tmp_path, toml_text, key):
    config = tmp_path / "bad.toml"
    config.write_text(toml_text)
    port = free_port()
    result = run(dicomagent_cmd("serve", "-c", str(config), "--host", "127.0.0.1",
                                "--port", str(port), "--data-dir", str(tmp_path / "data")),
                 timeout=15)
    assert result.returncode == 2, output(result)
    assert key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- shutdown -------------------------------------------------------------------------------

def test_sigterm_with_an_idle_association(agent_factory):
    """SIGTERM while an association is open and idle: the daemon ends it and exits 0 at once.

    An idle association has no operation in progress, so there is nothing for the
    shutdown grace period to let finish: the daemon aborts it (A-ABORT, service-user
    source, PS3.8 Table 9-26), the peer closes, and the daemon exits. dimse = 60
    keeps the idle timeout out of the picture.
    """
    agent = agent_factory("[agent.timeouts]\ndimse = 60.0\n")
    with RawPeer(agent.host, agent.port) as peer:
        peer.associate()
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        try:
            pdu = peer.read_pdu(timeout=5.0)
        except TimeoutError:
            pdu = None
    if pdu is None:
        # Our close ends the association, and with it the daemon's wait.
        agent.process.wait(10.0)
        pytest.fail("5 s after SIGTERM the idle association is still open: the shutdown "
                    "grace is for operations in progress, not idle associations; log:\n"
                    + agent.log())
    assert pdu == a_abort_bytes(0, 0)
    try:
        status = agent.process.wait(5.0)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 5 s after SIGTERM and the peer's close:\n" + agent.log())
    assert status == 0, agent.log()
    assert time.monotonic() - started < 5.0
    assert "stopped" in agent.log()


def test_sigint_stops_the_daemon(agent_factory):
    agent = agent_factory()
    assert echo(agent).returncode == 0
    agent.process.send_signal(signal.SIGINT)
    assert agent.process.wait(10.0) == 0, agent.log()
    assert "stopped" in agent.log()
