"""Storage SCU: send DICOM files to a peer (PS3.4 Annex B, the SCU side).

``scan`` finds the Part 10 files under some paths; ``plan_associations``
works out which presentation contexts to propose (only the SOP classes and
transfer syntaxes found, at most 128 contexts per association);
``store_files`` sends them, many objects per association. A file goes in
its own transfer syntax when the peer accepts it, straight from the file;
otherwise it is converted among the three uncompressed syntaxes
(``transcode``). The same functions serve ``dicomagent store`` and the
agent's own sub-operations (C-MOVE, forwarding).

References
----------
PS3.4 Annex B.2.1 (SCU behaviour); PS3.7 §9.1.1 (C-STORE); PS3.8 §9.3.2.2.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pydicom

from dicomagent.archive.part10 import NotPart10Error, read_file_meta
from dicomagent.association import AssociationError, associate
from dicomagent.dimse.commands import C_STORE_RQ
from dicomagent.dimse.status import StatusCategory, category
from dicomagent.transcode import UNCOMPRESSED, can_convert, encode_data_set
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger("dicomagent.store")

MAX_CONTEXTS = 128


@dataclass(frozen=True)
class LocalFile:
    """A Part 10 file to send: its UIDs and where its data set starts."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_offset: int


def read_local_file(path: str) -> LocalFile:
    """Read a file's Part 10 header (raises ``NotPart10Error`` or ``OSError``)."""
    with open(path, "rb") as handle:
        meta, offset = read_file_meta(handle)
    if not meta.get("sop_class_uid") or not meta.get("sop_instance_uid"):
        raise NotPart10Error("no Media Storage SOP Class/Instance UID")
    return LocalFile(path, meta["sop_class_uid"], meta["sop_instance_uid"],
                     meta["transfer_syntax"], offset)


def scan(paths: list[str]) -> tuple[list[LocalFile], list[tuple[str, str]]]:
    """The DICOM files under ``paths`` (folders recursively), and the others with a reason."""
    found: list[LocalFile] = []
    skipped: list[tuple[str, str]] = []

    def visit(path: str) -> None:
        try:
            found.append(read_local_file(path))
        except NotPart10Error as error:
            skipped.append((path, f"not a DICOM Part 10 file ({error})"))
        except OSError as error:
            skipped.append((path, error.strerror or str(error)))

    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    visit(os.path.join(root, name))
        else:
            visit(path)
    return found, skipped


def _contexts_for(sop_class: str, file_syntaxes: set[str],
                  proposed: tuple[str, ...] | None) -> list[ProposedContext]:
    """The contexts to propose for one SOP class.

    With ``proposed`` (``--ts``): one context with exactly those syntaxes.
    Otherwise one context per transfer syntax found (so each file can go as it
    is), and one more offering all three uncompressed syntaxes when a file is
    uncompressed, as a fallback to convert to.
    """
    if proposed:
        return [ProposedContext(sop_class, tuple(proposed))]
    contexts = [ProposedContext(sop_class, (ts,)) for ts in sorted(file_syntaxes)]
    if file_syntaxes & set(UNCOMPRESSED) and not set(UNCOMPRESSED) <= file_syntaxes:
        contexts.append(ProposedContext(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES))
    return contexts


def plan_associations(files: list[LocalFile], proposed: tuple[str, ...] | None = None
                      ) -> list[tuple[list[ProposedContext], list[LocalFile]]]:
    """Split the files into associations of at most 128 presentation contexts."""
    by_class: dict[str, list[LocalFile]] = {}
    for local in files:
        by_class.setdefault(local.sop_class_uid, []).append(local)
    plans: list[tuple[list[ProposedContext], list[LocalFile]]] = []
    contexts: list[ProposedContext] = []
    members: list[LocalFile] = []
    for sop_class, group in by_class.items():
        wanted = _contexts_for(sop_class, {f.transfer_syntax for f in group}, proposed)
        if contexts and len(contexts) + len(wanted) > MAX_CONTEXTS:
            plans.append((contexts, members))
            contexts, members = [], []
        contexts.extend(wanted)
        members.extend(group)
    if contexts:
        plans.append((contexts, members))
    return plans


@dataclass
class StoreReport:
    sent: int = 0
    warnings: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, path: str, reason: str) -> None:
        self.failed += 1
        self.failures.append((path, reason))


def choose_context(association, local: LocalFile, as_acceptor: bool = False):
    """The accepted context to send ``local`` on: its own syntax first, else one to convert to.

    ``as_acceptor``: we are the association-acceptor sending C-STORE (C-GET
    sub-operations), so the context must give the requestor the SCP role.
    """
    convertible = None
    for context in association.contexts.values():
        allowed = context.requestor_scp if as_acceptor else context.requestor_scu
        if context.abstract_syntax != local.sop_class_uid or not allowed:
            continue
        if context.transfer_syntax == local.transfer_syntax:
            return context
        if convertible is None and can_convert(local.transfer_syntax, context.transfer_syntax):
            convertible = context
    return convertible


async def send_one(association, local: LocalFile, move_originator: tuple[str, int] | None = None,
                   as_acceptor: bool = False) -> tuple[int, str]:
    """Send one file on an established association; return (status, comment)."""
    context = choose_context(association, local, as_acceptor)
    if context is None:
        return -1, (f"no accepted presentation context for {local.sop_class_uid} "
                    f"in {local.transfer_syntax} or a syntax it converts to")
    command = C_STORE_RQ(
        AffectedSOPClassUID=local.sop_class_uid, MessageID=association.next_message_id(),
        AffectedSOPInstanceUID=local.sop_instance_uid,
        MoveOriginatorApplicationEntityTitle=move_originator[0] if move_originator else None,
        MoveOriginatorMessageID=move_originator[1] if move_originator else None)
    if context.transfer_syntax == local.transfer_syntax:
        await association.send_file(context.context_id, command, local.path, local.data_offset)
    else:
        ds = pydicom.dcmread(local.path, force=True)
        data = encode_data_set(ds, local.transfer_syntax, context.transfer_syntax)
        association.send_message(context.context_id, command, data)
    try:
        response = await association.wait_response(command.MessageID)
    finally:
        association.done_with(command.MessageID)
    rsp = response.command
    return rsp.Status, rsp.ErrorComment or ""


async def store_files(host: str, port: int, calling_ae_title: str, called_ae_title: str,
                      files: list[LocalFile], proposed: tuple[str, ...] | None = None,
                      progress=None, timeout: float = 30.0) -> StoreReport:
    """Send ``files`` to a peer over as few associations as 128 contexts allow.

    ``progress(local, status, comment)`` is called after each file. A file
    the peer refused counts as failed; the rest are still sent. An
    association that fails counts its remaining files as failed.
    """
    report = StoreReport()
    for contexts, members in plan_associations(files, proposed):
        try:
            association = await associate(host, port, calling_ae_title, called_ae_title,
                                          contexts, artim_timeout=timeout,
                                          dimse_timeout=timeout, network_timeout=timeout)
        except AssociationError as error:
            for local in members:
                report.fail(local.path, str(error))
                if progress:
                    progress(local, -1, str(error))
            continue
        try:
            for index, local in enumerate(members):
                try:
                    status, comment = await send_one(association, local)
                except AssociationError as error:
                    for rest in members[index:]:
                        report.fail(rest.path, str(error))
                        if progress:
                            progress(rest, -1, str(error))
                    break
                kind = category(status) if status >= 0 else StatusCategory.FAILURE
                if kind is StatusCategory.SUCCESS:
                    report.sent += 1
                elif kind is StatusCategory.WARNING:
                    report.sent += 1
                    report.warnings += 1
                else:
                    report.fail(local.path, comment or f"status 0x{status:04X}")
                if progress:
                    progress(local, status, comment)
        finally:
            await association.release()
    return report
