"""Query/Retrieve SCU: C-FIND, C-MOVE and C-GET against a peer (PS3.4 C.4, SCU side).

``parse_keys`` reads ``-k`` arguments the way DCMTK's tools take them
(``Keyword=value``, ``gggg,eeee=value``, ``(gggg,eeee)=value``, an empty
value to ask for a return key, ``Sequence[0].Keyword=value`` for sequence
items); ``find``, ``move`` and ``get`` run one operation on a new association.

References
----------
PS3.4 C.4.1.2 (C-FIND SCU), C.4.2.2 (C-MOVE SCU), C.4.3.2 (C-GET SCU).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword

from dicomagent.archive.incoming import IncomingFile
from dicomagent.association import associate
from dicomagent.dimse.commands import (C_CANCEL_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ,
                                       C_STORE_RSP)
from dicomagent.dimse.status import StatusCategory, category
from dicomagent.services.gp import GENERAL_PURPOSE_WORKLIST_FIND
from dicomagent.services.mwl import MODALITY_WORKLIST_FIND
from dicomagent.services.qr import (PATIENT_ROOT_FIND, PATIENT_ROOT_GET, PATIENT_ROOT_MOVE,
                                    STUDY_ROOT_FIND, STUDY_ROOT_GET, STUDY_ROOT_MOVE)
from dicomagent.services.storage import TABLE_2
from dicomagent.transcode import decode, encode
from dicomagent.ul.items import SOPClassExtendedNegotiationSubItem
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

SOP_CLASSES = {
    ("find", "study"): STUDY_ROOT_FIND, ("find", "patient"): PATIENT_ROOT_FIND,
    ("move", "study"): STUDY_ROOT_MOVE, ("move", "patient"): PATIENT_ROOT_MOVE,
    ("get", "study"): STUDY_ROOT_GET, ("get", "patient"): PATIENT_ROOT_GET,
    ("find", "mwl"): MODALITY_WORKLIST_FIND, ("find", "gpwl"): GENERAL_PURPOSE_WORKLIST_FIND,
}
#: Information models without a Query/Retrieve Level (the worklists).
WORKLIST_MODELS = ("mwl", "gpwl")

_TAG = re.compile(r"\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?")
_STEP = re.compile(r"^(.+?)(?:\[(\d+)\])?$")


def _tag(name: str) -> int:
    match = _TAG.fullmatch(name.strip())
    if match:
        return int(match.group(1), 16) << 16 | int(match.group(2), 16)
    tag = tag_for_keyword(name.strip())
    if tag is None:
        raise ValueError(f"unknown attribute {name!r} (use a keyword or gggg,eeee)")
    return tag


def parse_keys(keys: list[str], level: str | None = None, require_level: bool = True
               ) -> pydicom.Dataset:
    """An identifier from ``-k`` arguments (DCMTK syntax); a worklist query has no
    Query/Retrieve Level (``require_level=False``)."""
    ds = pydicom.Dataset()
    if level:
        ds.QueryRetrieveLevel = level
    for key in keys:
        path, _, value = key.partition("=")
        target = ds
        steps = path.split(".")
        for step in steps[:-1]:
            match = _STEP.match(step)
            tag = _tag(match.group(1))
            index = int(match.group(2) or 0)
            if tag not in target:
                target.add_new(tag, "SQ", [])
            sequence = target[tag].value
            while len(sequence) <= index:
                sequence.append(pydicom.Dataset())
            target = sequence[index]
        tag = _tag(steps[-1])
        vr = dictionary_VR(tag) if pydicom.datadict.dictionary_has_tag(tag) else "UN"
        if vr == "SQ":
            target.add_new(tag, "SQ", [] if not value else [pydicom.Dataset()])
        else:
            target.add_new(tag, vr, value if value else None)
    if require_level and "QueryRetrieveLevel" not in ds:
        raise ValueError("no Query/Retrieve Level: give -L LEVEL or -k QueryRetrieveLevel=...")
    if any(ord(c) > 127 for element in ds if isinstance(element.value, str)
           for c in element.value) and "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


@dataclass
class FindResult:
    status: int = 0
    comment: str = ""
    matches: list[pydicom.Dataset] = field(default_factory=list)


async def find(host: str, port: int, calling: str, called: str, identifier: pydicom.Dataset,
               model: str = "study", timeout: float = 30.0, on_match=None,
               cancel_after: int | None = None, date_time_matching: bool = False) -> FindResult:
    """C-FIND: every pending match (also passed to ``on_match``), then the final status.

    ``cancel_after``: send C-CANCEL-RQ after that many matches.
    ``date_time_matching``: ask for combined date-time matching (PS3.4 C.5.1.1.2,
    extended negotiation byte 2), so a Date and its Time are one range.
    """
    sop_class = SOP_CLASSES[("find", model)]
    extra = (SOPClassExtendedNegotiationSubItem(sop_class, b"\x00\x01"),) \
        if date_time_matching else ()
    association = await associate(host, port, calling, called,
                                  [ProposedContext(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=timeout, dimse_timeout=timeout,
                                  network_timeout=timeout, extra_sub_items=extra)
    result = FindResult()
    try:
        context = association.context_for(sop_class)
        message_id = association.next_message_id()
        association.send_message(context.context_id, C_FIND_RQ(
            AffectedSOPClassUID=sop_class, MessageID=message_id),
            encode(identifier, context.transfer_syntax))
        cancelled = False
        while True:
            received = await association.wait_response(message_id)
            rsp = received.command
            if category(rsp.Status) is StatusCategory.PENDING:
                match = decode(received.data_set or b"", context.transfer_syntax)
                result.matches.append(match)
                if on_match:
                    on_match(match)
                if cancel_after is not None and len(result.matches) >= cancel_after \
                        and not cancelled:
                    association.send_message(context.context_id, C_CANCEL_RQ(
                        MessageIDBeingRespondedTo=message_id))
                    cancelled = True
                continue
            result.status = rsp.Status
            result.comment = rsp.ErrorComment or ""
            break
        association.done_with(message_id)
    finally:
        await association.release()
    return result


@dataclass
class RetrieveResult:
    status: int = 0
    comment: str = ""
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)


def _counts(result: RetrieveResult, rsp) -> None:
    result.completed = rsp.NumberOfCompletedSuboperations or 0
    result.failed = rsp.NumberOfFailedSuboperations or 0
    result.warning = rsp.NumberOfWarningSuboperations or 0


async def _retrieve(association, sop_class: str, command, identifier: pydicom.Dataset,
                    on_progress) -> RetrieveResult:
    context = association.context_for(sop_class)
    association.send_message(context.context_id, command,
                             encode(identifier, context.transfer_syntax))
    result = RetrieveResult()
    while True:
        received = await association.wait_response(command.MessageID)
        rsp = received.command
        _counts(result, rsp)
        if rsp.Status == 0xFF00:
            if on_progress:
                on_progress(rsp)
            continue
        result.status = rsp.Status
        result.comment = rsp.ErrorComment or ""
        if received.data_set:
            failed = decode(received.data_set, context.transfer_syntax)
            uids = failed.get("FailedSOPInstanceUIDList", [])
            result.failed_uids = [uids] if isinstance(uids, str) else list(uids)
        break
    association.done_with(command.MessageID)
    return result


async def move(host: str, port: int, calling: str, called: str, destination: str,
               identifier: pydicom.Dataset, model: str = "study", timeout: float = 30.0,
               on_progress=None) -> RetrieveResult:
    """C-MOVE: ask the peer to send the matching instances to ``destination``."""
    sop_class = SOP_CLASSES[("move", model)]
    association = await associate(host, port, calling, called,
                                  [ProposedContext(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=timeout, dimse_timeout=None,
                                  network_timeout=timeout)
    association.dimse_timeout = max(timeout, 600.0)
    try:
        return await _retrieve(association, sop_class, C_MOVE_RQ(
            AffectedSOPClassUID=sop_class, MessageID=association.next_message_id(),
            MoveDestination=destination), identifier, on_progress)
    finally:
        await association.release()


async def get(host: str, port: int, calling: str, called: str, out_dir: str,
              identifier: pydicom.Dataset, model: str = "study", timeout: float = 30.0,
              on_progress=None, storage_classes: dict[str, str] | None = None) -> RetrieveResult:
    """C-GET: receive the matching instances on this association into ``out_dir``.

    Proposes the storage SOP classes (the seed's Table 2 by default) with
    SCP/SCU Role Selection giving us the SCP role (PS3.4 C.4.3.2.1).
    """
    sop_class = SOP_CLASSES[("get", model)]
    storage_classes = storage_classes or TABLE_2
    contexts = [ProposedContext(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)]
    contexts += [ProposedContext(uid, UNCOMPRESSED_TRANSFER_SYNTAXES, scu_role=False,
                                 scp_role=True) for uid in list(storage_classes)[:127]]
    os.makedirs(out_dir, exist_ok=True)
    received_paths: list[str] = []

    def open_sink(association, context, command: C_STORE_RQ):
        return IncomingFile(out_dir, command.AffectedSOPClassUID or "",
                            command.AffectedSOPInstanceUID or "", context.transfer_syntax,
                            association.called_ae_title, 0.0)

    def on_store(association, context, received) -> None:
        incoming: IncomingFile = received.data_set
        request: C_STORE_RQ = received.command
        status = 0x0000
        if incoming.failure or incoming.fd < 0:
            status = 0xA700
        else:
            name = re.sub(r"[^0-9.]", "_", request.AffectedSOPInstanceUID or "x")[:64] + ".dcm"
            final = os.path.join(os.path.abspath(out_dir), name)
            incoming.put_in_place(final)
            os.close(incoming.fd)
            incoming.fd = -1
            received_paths.append(final)
        association.send_message(context.context_id, C_STORE_RSP(
            AffectedSOPClassUID=request.AffectedSOPClassUID,
            MessageIDBeingRespondedTo=request.MessageID, Status=status,
            AffectedSOPInstanceUID=request.AffectedSOPInstanceUID))

    association = await associate(host, port, calling, called, contexts,
                                  artim_timeout=timeout, dimse_timeout=None,
                                  network_timeout=timeout)
    association.dimse_timeout = max(timeout, 600.0)
    for context in association.contexts.values():
        if context.requestor_scp:
            association.handlers[(C_STORE_RQ, context.abstract_syntax)] = on_store
            association.sinks[(C_STORE_RQ, context.abstract_syntax)] = open_sink
    try:
        result = await _retrieve(association, sop_class, C_GET_RQ(
            AffectedSOPClassUID=sop_class, MessageID=association.next_message_id()),
            identifier, on_progress)
    finally:
        await association.release()
    result.received = received_paths
    return result
