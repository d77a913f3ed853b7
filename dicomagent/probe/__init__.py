"""``dicomagent probe``: what a peer really does, check by check.

The probe opens associations to a peer and records, for each check, an
outcome (pass, fail, not supported, info), the evidence (what was sent and
what came back: statuses, reasons, missing keys) and the part of the
standard that says what should happen. Three groups run by default, a
fourth only with ``--allow-writes`` because it changes the peer:

association
    our AE accepted; a wrong Called AE Title; the A-ASSOCIATE-AC's maximum
    PDU length, implementation class UID and version name; A-RELEASE; an
    A-ABORT; an abstract syntax nobody knows (PS3.8 §7.1, §7.2, §7.3,
    Table 9-18; PS3.7 D.3.3).
contexts
    every SOP class dicomagent knows (storage, query/retrieve, worklists,
    procedure steps, storage commitment, print), each transfer syntax
    proposed in a context of its own, in associations of at most 128
    contexts: which are accepted; then all three in one context: which the
    peer picks (PS3.8 §9.3.3.2; PS3.5 §10.1: a SOP class accepted at all
    must be accepted in Implicit VR Little Endian).
services
    C-ECHO; C-FIND on each accepted Q/R model at each level with a probe
    identifier (responses must hold the keys asked for, and only those and
    the ones PS3.4 C.4.1.1.3.2 allows); Modality and General Purpose
    Worklist queries (one Scheduled Procedure Step per response, K.6.1.2.2).
writes (``--allow-writes``)
    a synthetic object C-STOREd per accepted storage class and transfer
    syntax; found again by C-FIND, fetched back by C-GET and, with
    ``--listen-port`` (and our AE known to the peer), by C-MOVE; an MPPS
    N-CREATE and N-SET; storage commitment of what was stored.

The results print as a table, and as JSON or Markdown (``--json``, ``--md``).
The exit code is 0 when no check failed.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import asdict, dataclass, field

from dicomagent.association import AssociationError, AssociationRejected, associate
from dicomagent.config import Config
from dicomagent.dimse.commands import C_ECHO_RQ
from dicomagent.services import registry
from dicomagent.services.storage import all_storage_sop_classes
from dicomagent.ul.codes import PresentationContextResult, reject_reason_text
from dicomagent.ul.negotiation import ProposedContext, build_associate_rq
from dicomagent.ul.pdu import A_ABORT
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN, UNCOMPRESSED_TRANSFER_SYNTAXES)

PASS, FAIL, NOT_SUPPORTED, INFO = "pass", "fail", "not supported", "info"
GROUPS = ("association", "contexts", "services", "writes")

VERIFICATION = "1.2.840.10008.1.1"
#: An abstract syntax no peer can know (a UID under this implementation's root).
UNKNOWN_ABSTRACT_SYNTAX = "1.2.826.0.1.3680043.9.7433.99.1"

TS_NAMES = {IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR LE", EXPLICIT_VR_LITTLE_ENDIAN:
            "Explicit VR LE", EXPLICIT_VR_BIG_ENDIAN: "Explicit VR BE"}

MAX_CONTEXTS = 128


@dataclass
class Check:
    """One check's result."""

    group: str
    name: str
    outcome: str
    evidence: str
    reference: str


@dataclass
class ContextSupport:
    """What the peer accepted for one SOP class."""

    sop_class_uid: str
    name: str
    accepted: list[str] = field(default_factory=list)
    preferred: str = ""


def known_sop_classes() -> dict[str, str]:
    """Every SOP class dicomagent knows: its registry (print included) and every storage
    class."""
    config = Config()
    config.storage.accept_all_storage_classes = True
    classes: dict[str, str] = {}
    for service in registry(config):
        classes.update(service.sop_classes)
    classes.update(all_storage_sop_classes())
    return classes


class Probe:
    """Runs the checks against one peer; ``results`` and ``contexts`` hold what was found."""

    def __init__(self, host: str, port: int, calling: str = "DICOMAGENT",
                 called: str = "ANY-SCP", timeout: float = 10.0, allow_writes: bool = False,
                 listen_port: int | None = None, groups: tuple[str, ...] | None = None):
        self.host, self.port = host, port
        self.calling, self.called = calling, called
        self.timeout = timeout
        self.allow_writes = allow_writes
        self.listen_port = listen_port
        self.groups = groups or tuple(g for g in GROUPS if g != "writes" or allow_writes)
        self.results: list[Check] = []
        self.contexts: dict[str, ContextSupport] = {}
        self.peer: dict = {}

    # --- helpers -------------------------------------------------------------------------

    def record(self, group: str, name: str, outcome: str, evidence: str, reference: str):
        self.results.append(Check(group, name, outcome, evidence, reference))

    async def associate(self, contexts: list[ProposedContext], called: str | None = None,
                        **kwargs):
        return await associate(self.host, self.port, self.calling, called or self.called,
                               contexts, artim_timeout=self.timeout, dimse_timeout=self.timeout,
                               network_timeout=self.timeout, **kwargs)

    def accepted(self, sop_class: str) -> bool:
        support = self.contexts.get(sop_class)
        return bool(support and support.accepted)

    async def run(self) -> list[Check]:
        if "association" in self.groups:
            if not await self.check_association():
                return self.results
        elif not await self.check_reachable():
            return self.results
        if "contexts" in self.groups or "services" in self.groups or "writes" in self.groups:
            await self.check_contexts(record="contexts" in self.groups)
        if "services" in self.groups:
            await self.check_services()
        if "writes" in self.groups:
            from dicomagent.probe.writes import check_writes
            await check_writes(self)
        return self.results

    @property
    def failed(self) -> bool:
        return any(check.outcome == FAIL for check in self.results)

    # --- association ---------------------------------------------------------------------

    async def check_association(self) -> bool:
        """PS3.8 §7.1-7.3; False when the peer does not accept us at all."""
        group = "association"
        try:
            association = await self.associate([ProposedContext(VERIFICATION)])
        except AssociationRejected as rejected:
            self.record(group, "accepts our AE", FAIL, str(rejected), "PS3.8 §7.1.1.7, Table 9-21")
            return False
        except AssociationError as error:
            self.record(group, "accepts our AE", FAIL, str(error), "PS3.8 §7.1")
            return False
        user = association.ac.user_information
        self.peer = {"maximum_length": user.maximum_length_received,
                     "implementation_class_uid": user.implementation_class_uid,
                     "implementation_version_name": user.implementation_version_name,
                     "ae_title": association.ac.called_ae_title}
        self.record(group, "accepts our AE", PASS,
                    f"A-ASSOCIATE-AC to {self.calling} -> {self.called}", "PS3.8 §7.1")
        maximum = user.maximum_length_received
        self.record(group, "maximum PDU length", INFO if maximum is not None else FAIL,
                    "unlimited (0)" if maximum == 0 else
                    f"{maximum} bytes" if maximum is not None else "no Maximum Length sub-item",
                    "PS3.8 D.1")
        uid = user.implementation_class_uid
        self.record(group, "implementation class UID", PASS if uid else FAIL,
                    uid or "missing from A-ASSOCIATE-AC", "PS3.7 D.3.3.2")
        self.record(group, "implementation version name", INFO,
                    user.implementation_version_name or "(none)", "PS3.7 D.3.3.2")
        await association.release()
        self.record(group, "A-RELEASE", PASS if association.end_reason == "released" else FAIL,
                    f"A-RELEASE-RQ -> {association.end_reason}", "PS3.8 §7.2, Table 9-10 AR-*")
        await self._check_wrong_called_ae(group)
        await self._check_abort(group)
        await self._check_unknown_context(group)
        return True

    async def check_reachable(self) -> bool:
        """Without the association group: one association, so that a peer that cannot be
        reached fails the probe instead of showing every SOP class "not supported"."""
        try:
            association = await self.associate([ProposedContext(VERIFICATION)])
        except AssociationRejected:
            return True             # it answers; Verification is just not accepted
        except AssociationError as error:
            self.record("association", "accepts our AE", FAIL, str(error), "PS3.8 §7.1")
            return False
        await association.release()
        return True

    async def _check_wrong_called_ae(self, group: str) -> None:
        try:
            association = await self.associate([ProposedContext(VERIFICATION)],
                                               called="NOT-" + self.called[:12])
        except AssociationRejected as rejected:
            rj = rejected.rj
            right = rj.source == 1 and rj.reason == 7
            self.record(group, "wrong Called AE Title", PASS if right else INFO,
                        f"rejected: {reject_reason_text(rj.source, rj.reason)}"
                        + ("" if right else " (called-AE-title-not-recognized expected)"),
                        "PS3.8 Table 9-21")
            return
        except AssociationError as error:
            self.record(group, "wrong Called AE Title", FAIL, str(error), "PS3.8 Table 9-21")
            return
        await association.release()
        self.record(group, "wrong Called AE Title", INFO,
                    "accepted (the peer does not check the Called AE Title)", "PS3.8 §7.1.1.4")

    async def _check_abort(self, group: str) -> None:
        """An A-ABORT after the association is set up: the peer closes the connection."""
        rq = build_associate_rq(self.calling, self.called, [ProposedContext(VERIFICATION)])
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
        except (OSError, asyncio.TimeoutError) as error:
            self.record(group, "A-ABORT", FAIL, f"cannot connect: {error}", "PS3.8 §7.3")
            return
        try:
            writer.write(rq.encode())
            header = await asyncio.wait_for(reader.readexactly(6), self.timeout)
            await asyncio.wait_for(reader.readexactly(struct.unpack(">I", header[2:])[0]),
                                   self.timeout)
            if header[0] != 0x02:
                self.record(group, "A-ABORT", INFO, f"association not accepted (PDU type "
                            f"{header[0]:02X}H)", "PS3.8 §7.3")
                return
            writer.write(A_ABORT(0, 0).encode())
            started = time.monotonic()
            rest = await asyncio.wait_for(reader.read(), self.timeout)
            self.record(group, "A-ABORT", PASS if not rest else FAIL,
                        f"connection closed by the peer {time.monotonic() - started:.2f} s "
                        f"after A-ABORT" + (f", after {len(rest)} more bytes" if rest else ""),
                        "PS3.8 §7.3, Table 9-10 AA-3")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as error:
            self.record(group, "A-ABORT", FAIL,
                        f"{type(error).__name__}: the peer did not close the connection in "
                        f"{self.timeout:g} s" if isinstance(error, asyncio.TimeoutError)
                        else f"{type(error).__name__}: {error}", "PS3.8 §7.3")
        finally:
            writer.close()

    async def _check_unknown_context(self, group: str) -> None:
        try:
            association = await self.associate([ProposedContext(VERIFICATION),
                                                ProposedContext(UNKNOWN_ABSTRACT_SYNTAX)])
        except AssociationError as error:
            self.record(group, "unknown abstract syntax", FAIL,
                        f"whole association refused: {error}", "PS3.8 §9.3.3.2")
            return
        results = {pc.context_id: pc.result for pc in association.ac.presentation_contexts}
        await association.release()
        result = results.get(3)
        ok = result == PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
        self.record(group, "unknown abstract syntax", PASS if ok else FAIL,
                    f"context result {result} ({_context_result(result)})",
                    "PS3.8 §9.3.3.2, Table 9-18 (result 3 expected)")

    # --- presentation contexts -------------------------------------------------------------

    async def check_contexts(self, record: bool = True) -> None:
        """Each SOP class with each transfer syntax alone, then all three together."""
        classes = known_sop_classes()
        self.contexts = {uid: ContextSupport(uid, name) for uid, name in classes.items()}
        single = [(uid, ts) for uid in classes for ts in UNCOMPRESSED_TRANSFER_SYNTAXES]
        for start in range(0, len(single), MAX_CONTEXTS):
            batch = single[start:start + MAX_CONTEXTS]
            answers = await self._negotiate([ProposedContext(uid, (ts,)) for uid, ts in batch])
            for (uid, ts), accepted_ts in zip(batch, answers):
                if accepted_ts:
                    self.contexts[uid].accepted.append(ts)
        supported = [uid for uid in classes if self.contexts[uid].accepted]
        for start in range(0, len(supported), MAX_CONTEXTS):
            batch = supported[start:start + MAX_CONTEXTS]
            answers = await self._negotiate([ProposedContext(uid) for uid in batch])
            for uid, accepted_ts in zip(batch, answers):
                self.contexts[uid].preferred = accepted_ts or ""
        if not record:
            return
        for uid, support in self.contexts.items():
            if not support.accepted:
                continue
            names = ", ".join(TS_NAMES[ts] for ts in support.accepted)
            implicit = IMPLICIT_VR_LITTLE_ENDIAN in support.accepted
            self.record("contexts", f"{support.name}", PASS if implicit else FAIL,
                        f"accepted: {names}; picks {TS_NAMES.get(support.preferred, '-')} "
                        f"of all three" + ("" if implicit else
                                           "; Implicit VR Little Endian refused"),
                        "PS3.5 §10.1, PS3.8 §9.3.3.2")
        refused = sum(1 for s in self.contexts.values() if not s.accepted)
        self.record("contexts", "SOP classes not supported", INFO,
                    f"{refused} of {len(self.contexts)} known SOP classes refused in every "
                    f"transfer syntax", "PS3.8 §9.3.3.2")

    async def _negotiate(self, proposed: list[ProposedContext]) -> list[str | None]:
        """The transfer syntax accepted for each proposed context (None: refused)."""
        try:
            association = await self.associate(proposed)
        except AssociationError:
            return [None] * len(proposed)
        accepted = {context.context_id: context.transfer_syntax
                    for context in association.contexts.values()}
        await association.release()
        return [accepted.get(2 * index + 1) for index in range(len(proposed))]

    # --- services --------------------------------------------------------------------------

    async def check_services(self) -> None:
        from dicomagent.probe.queries import check_finds, check_worklists
        if self.accepted(VERIFICATION):
            await self.check_echo()
        else:
            self.record("services", "C-ECHO", NOT_SUPPORTED, "Verification not accepted",
                        "PS3.4 Annex A")
        await check_finds(self)
        await check_worklists(self)

    async def check_echo(self) -> None:
        try:
            association = await self.associate([ProposedContext(VERIFICATION)])
            try:
                context = association.context_for(VERIFICATION)
                response = await association.request(context.context_id, C_ECHO_RQ(
                    AffectedSOPClassUID=VERIFICATION, MessageID=association.next_message_id()))
            finally:
                await association.release()
        except AssociationError as error:
            self.record("services", "C-ECHO", FAIL, str(error), "PS3.4 A.4")
            return
        status = response.command.Status
        self.record("services", "C-ECHO", PASS if status == 0 else FAIL,
                    f"status 0x{status:04X}", "PS3.4 A.4, PS3.7 §9.3.5")


def _context_result(result) -> str:
    try:
        return PresentationContextResult(result).name.lower().replace("_", "-")
    except (ValueError, TypeError):
        return "no answer"


# --- output --------------------------------------------------------------------------------

def to_json(probe: Probe) -> dict:
    return {"peer": {"host": probe.host, "port": probe.port, "called_ae_title": probe.called,
                     **probe.peer},
            "checks": [asdict(check) for check in probe.results],
            "contexts": [asdict(support) for support in probe.contexts.values()
                         if support.accepted],
            "failed": sum(1 for check in probe.results if check.outcome == FAIL)}


def to_markdown(probe: Probe) -> str:
    lines = [f"# Conformance probe of {probe.called} at {probe.host}:{probe.port}", ""]
    for group in GROUPS:
        checks = [check for check in probe.results if check.group == group]
        if not checks:
            continue
        lines += [f"## {group}", "", "| check | outcome | evidence | reference |",
                  "|---|---|---|---|"]
        for check in checks:
            lines.append(f"| {_cell(check.name)} | {check.outcome} | {_cell(check.evidence)} | "
                         f"{_cell(check.reference)} |")
        lines.append("")
    failed = sum(1 for check in probe.results if check.outcome == FAIL)
    lines.append(f"{len(probe.results)} checks, {failed} failed.")
    return "\n".join(lines) + "\n"


def to_table(probe: Probe) -> str:
    width = max([len(check.name) for check in probe.results] + [10])
    width = min(width, 48)
    lines = []
    for group in GROUPS:
        checks = [check for check in probe.results if check.group == group]
        if not checks:
            continue
        lines.append(f"{group}:")
        for check in checks:
            lines.append(f"  {check.name[:width].ljust(width)}  {check.outcome.ljust(13)}  "
                         f"{check.evidence}")
    failed = sum(1 for check in probe.results if check.outcome == FAIL)
    lines.append(f"{len(probe.results)} checks, {failed} failed")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
