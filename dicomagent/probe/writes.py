"""The probe's writing checks (``--allow-writes``): they leave data on the peer.

1. C-STORE: one synthetic object per accepted storage SOP class and transfer
   syntax, each on a context proposing only that syntax, all in one study of
   patient ``DICOMAGENT^PROBE`` (PS3.4 B.2).
2. C-FIND: the study at STUDY level, its instances at IMAGE level; every
   object stored must be found (PS3.4 C.4.1).
3. C-GET of the study on one association (PS3.4 C.4.3), and C-MOVE to our
   own AE with ``--listen-port`` (PS3.4 C.4.2; the peer must know our AE).
4. MPPS N-CREATE (IN PROGRESS) then N-SET (COMPLETED) (PS3.4 F.7).
5. Storage commitment of what was stored: every instance reported
   committed (PS3.4 J.3).
"""

from __future__ import annotations

import tempfile

import pydicom
from pydicom.uid import generate_uid

from dicomagent.association import AssociationError
from dicomagent.commit import commit
from dicomagent.dimse.commands import C_STORE_RQ, C_STORE_RSP, DATA_SET_PRESENT
from dicomagent.dimse.status import StatusCategory, category
from dicomagent.listener import Listener
from dicomagent.normalized import n_create, n_set
from dicomagent.qrscu import SOP_CLASSES, find, get, move
from dicomagent.services.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from dicomagent.services.mpps import MODALITY_PERFORMED_PROCEDURE_STEP
from dicomagent.services.storage import all_storage_sop_classes
from dicomagent.transcode import encode
from dicomagent.ul.negotiation import AbstractSyntaxSupport, ProposedContext

PASS, FAIL, NOT_SUPPORTED, INFO = "pass", "fail", "not supported", "info"
MAX_CONTEXTS = 128


def synthetic_object(sop_class: str, study_uid: str, series_uid: str, number: int
                     ) -> pydicom.Dataset:
    """A small object of ``sop_class``: patient, study, series and instance modules,
    and an 8x8 monochrome image for the image storage classes."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "DICOMAGENT^PROBE"
    ds.PatientID = "DICOMAGENT-PROBE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "PROBE"
    ds.StudyDate = "20000101"
    ds.StudyTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    if "Image" in pydicom.uid.UID(sop_class).name:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(range(64))
    return ds


async def check_writes(probe) -> None:
    storage = all_storage_sop_classes()
    pairs = [(uid, ts) for uid, support in probe.contexts.items() if uid in storage
             for ts in support.accepted]
    study_uid, series_uid = generate_uid(), generate_uid()
    stored = await _store(probe, pairs, study_uid, series_uid)
    if stored:
        await _find_back(probe, study_uid, stored)
        await _get_back(probe, study_uid, series_uid, stored)
        await _move_back(probe, study_uid, stored)
    await _mpps(probe)
    await _commitment(probe, stored)


async def _store(probe, pairs: list[tuple[str, str]], study_uid: str, series_uid: str
                 ) -> list[tuple[str, str]]:
    """C-STORE one object per (SOP class, transfer syntax); the (class, instance) stored."""
    if not pairs:
        probe.record("writes", "C-STORE", NOT_SUPPORTED, "no storage SOP class accepted",
                     "PS3.4 B.2")
        return []
    stored: list[tuple[str, str]] = []
    failures: list[str] = []
    for start in range(0, len(pairs), MAX_CONTEXTS):
        batch = pairs[start:start + MAX_CONTEXTS]
        try:
            association = await probe.associate([ProposedContext(uid, (ts,))
                                                 for uid, ts in batch])
        except AssociationError as error:
            failures.append(str(error))
            continue
        try:
            for index, (uid, ts) in enumerate(batch):
                context = association.contexts.get(2 * index + 1)
                if context is None:
                    failures.append(f"{uid} in {ts}: context refused this time")
                    continue
                ds = synthetic_object(uid, study_uid, series_uid, len(stored) + 1)
                response = await association.request(context.context_id, C_STORE_RQ(
                    AffectedSOPClassUID=uid, MessageID=association.next_message_id(),
                    AffectedSOPInstanceUID=ds.SOPInstanceUID, CommandDataSetType=DATA_SET_PRESENT),
                    encode(ds, ts))
                status = response.command.Status
                if category(status) in (StatusCategory.SUCCESS, StatusCategory.WARNING):
                    stored.append((uid, ds.SOPInstanceUID))
                else:
                    failures.append(f"{pydicom.uid.UID(uid).name} in {ts}: 0x{status:04X}")
        except AssociationError as error:
            failures.append(str(error))
        finally:
            await association.release()
    probe.record("writes", "C-STORE", FAIL if failures else PASS,
                 f"{len(stored)} of {len(pairs)} objects stored (one per accepted storage "
                 f"class and transfer syntax)" + (f"; {'; '.join(failures[:3])}"
                                                  if failures else ""), "PS3.4 B.2")
    return stored


async def _find_back(probe, study_uid: str, stored: list) -> None:
    model = "study" if probe.accepted(SOP_CLASSES[("find", "study")]) else "patient"
    if not probe.accepted(SOP_CLASSES[("find", model)]):
        probe.record("writes", "C-FIND of the stored objects", NOT_SUPPORTED,
                     "no Q/R FIND model accepted", "PS3.4 C.4.1")
        return
    # IMAGE level needs the series: ask the SERIES level first.
    series = _study_identifier(model, study_uid, "SERIES")
    series.SeriesInstanceUID = ""
    identifier = _study_identifier(model, study_uid, "IMAGE")
    identifier.SeriesInstanceUID = ""
    identifier.SOPInstanceUID = ""
    try:
        found_series = await find(probe.host, probe.port, probe.calling, probe.called, series,
                                  model, probe.timeout)
        found = set()
        for match in found_series.matches:
            identifier.SeriesInstanceUID = str(match.get("SeriesInstanceUID", ""))
            result = await find(probe.host, probe.port, probe.calling, probe.called,
                                identifier, model, probe.timeout)
            found |= {str(m.get("SOPInstanceUID", "")) for m in result.matches}
    except AssociationError as error:
        probe.record("writes", "C-FIND of the stored objects", FAIL, str(error), "PS3.4 C.4.1")
        return
    missing = [uid for _, uid in stored if uid not in found]
    probe.record("writes", "C-FIND of the stored objects", FAIL if missing else PASS,
                 f"{len(stored) - len(missing)} of {len(stored)} found at IMAGE level",
                 "PS3.4 C.4.1")


def _study_identifier(model: str, study_uid: str, level: str = "STUDY") -> pydicom.Dataset:
    """An identifier inside the probe's study (with its patient in the Patient Root model)."""
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = level
    if model == "patient":
        identifier.PatientID = "DICOMAGENT-PROBE"
    identifier.StudyInstanceUID = study_uid
    return identifier


async def _get_back(probe, study_uid: str, series_uid: str, stored: list) -> None:
    """C-GET of what was stored. One association carries at most 127 storage contexts
    beside the C-GET one (PS3.8 §9.3.2.2), and sub-operations go only on negotiated
    contexts (PS3.4 C.4.3.1.3): with more classes, one C-GET per 127 classes, at IMAGE level
    for that batch's instances."""
    model = "study" if probe.accepted(SOP_CLASSES[("get", "study")]) else "patient"
    name = "C-GET of the stored objects"
    if not probe.accepted(SOP_CLASSES[("get", model)]):
        probe.record("writes", name, NOT_SUPPORTED, "no Q/R GET model accepted", "PS3.4 C.4.3")
        return
    by_class: dict[str, list[str]] = {}
    for sop_class, sop_instance in stored:
        by_class.setdefault(sop_class, []).append(sop_instance)
    classes = list(by_class)
    batches = [classes[i:i + MAX_CONTEXTS - 1] for i in range(0, len(classes), MAX_CONTEXTS - 1)]
    completed = failed = 0
    statuses = []
    with tempfile.TemporaryDirectory(prefix="dicomagent-probe-") as out:
        for batch in batches:
            identifier = _study_identifier(model, study_uid,
                                           "STUDY" if len(batches) == 1 else "IMAGE")
            if len(batches) > 1:
                identifier.SeriesInstanceUID = series_uid
                identifier.SOPInstanceUID = [uid for c in batch for uid in by_class[c]]
            try:
                result = await get(probe.host, probe.port, probe.calling, probe.called, out,
                                   identifier, model, probe.timeout,
                                   storage_classes={uid: "" for uid in batch})
            except AssociationError as error:
                probe.record("writes", name, FAIL, str(error), "PS3.4 C.4.3")
                return
            completed += result.completed
            failed += result.failed
            statuses.append(result.status)
    ok = all(status == 0 for status in statuses) and completed == len(stored)
    probe.record("writes", name, PASS if ok else FAIL,
                 f"status {', '.join(f'0x{status:04X}' for status in statuses)}, {completed} "
                 f"of {len(stored)} received, {failed} failed"
                 + (f" ({len(batches)} C-GETs of at most {MAX_CONTEXTS - 1} classes)"
                    if len(batches) > 1 else ""), "PS3.4 C.4.3")


async def _move_back(probe, study_uid: str, stored: list) -> None:
    model = "study" if probe.accepted(SOP_CLASSES[("move", "study")]) else "patient"
    name = "C-MOVE of the stored objects to us"
    if not probe.accepted(SOP_CLASSES[("move", model)]):
        probe.record("writes", name, NOT_SUPPORTED, "no Q/R MOVE model accepted", "PS3.4 C.4.2")
        return
    if probe.listen_port is None:
        probe.record("writes", name, NOT_SUPPORTED,
                     "not tried: give --listen-port (and make our AE known to the peer)",
                     "PS3.4 C.4.2")
        return
    received: list[str] = []

    def on_store(association, context, message) -> None:
        request = message.command
        received.append(request.AffectedSOPInstanceUID or "")
        association.send_message(context.context_id, C_STORE_RSP(
            AffectedSOPClassUID=request.AffectedSOPClassUID,
            MessageIDBeingRespondedTo=request.MessageID, Status=0x0000,
            AffectedSOPInstanceUID=request.AffectedSOPInstanceUID))

    classes = {uid for uid, _ in stored}
    listener = Listener(probe.calling, {uid: AbstractSyntaxSupport() for uid in classes},
                        {(C_STORE_RQ, uid): on_store for uid in classes}, probe.timeout)
    await listener.start("0.0.0.0", probe.listen_port)
    try:
        result = await move(probe.host, probe.port, probe.calling, probe.called, probe.calling,
                            _study_identifier(model, study_uid), model, probe.timeout)
    except AssociationError as error:
        probe.record("writes", name, FAIL, str(error), "PS3.4 C.4.2")
        return
    finally:
        listener.close()
    if result.status == 0xA801:
        probe.record("writes", name, NOT_SUPPORTED,
                     f"0xA801: the peer does not know our AE {probe.calling} (port "
                     f"{probe.listen_port})", "PS3.4 C.4.2.1.4")
        return
    ok = result.status == 0 and len(set(received)) == len(stored)
    probe.record("writes", name, PASS if ok else FAIL,
                 f"status 0x{result.status:04X}, {len(set(received))} of {len(stored)} "
                 f"received", "PS3.4 C.4.2")


async def _mpps(probe) -> None:
    name = "MPPS N-CREATE / N-SET"
    if not probe.accepted(MODALITY_PERFORMED_PROCEDURE_STEP):
        probe.record("writes", name, NOT_SUPPORTED, "SOP class not accepted", "PS3.4 F.7")
        return
    uid = generate_uid()
    created = pydicom.Dataset()
    created.PerformedProcedureStepStatus = "IN PROGRESS"
    created.PerformedProcedureStepID = "PROBE"
    created.PerformedProcedureStepStartDate = "20000101"
    created.PerformedProcedureStepStartTime = "000000"
    created.PatientName = "DICOMAGENT^PROBE"
    created.PatientID = "DICOMAGENT-PROBE"
    created.Modality = "OT"
    created.ScheduledStepAttributesSequence = [pydicom.Dataset()]
    created.ScheduledStepAttributesSequence[0].StudyInstanceUID = generate_uid()
    completed = pydicom.Dataset()
    completed.PerformedProcedureStepStatus = "COMPLETED"
    completed.PerformedProcedureStepEndDate = "20000101"
    completed.PerformedProcedureStepEndTime = "000100"
    try:
        association = await probe.associate([ProposedContext(MODALITY_PERFORMED_PROCEDURE_STEP)])
        try:
            first = await n_create(association, MODALITY_PERFORMED_PROCEDURE_STEP, uid, created)
            second = await n_set(association, MODALITY_PERFORMED_PROCEDURE_STEP, uid, completed) \
                if first.status == 0 else None
        finally:
            await association.release()
    except AssociationError as error:
        probe.record("writes", name, FAIL, str(error), "PS3.4 F.7")
        return
    ok = first.status == 0 and second is not None and second.status == 0
    probe.record("writes", name, PASS if ok else FAIL,
                 f"N-CREATE 0x{first.status:04X}"
                 + (f", N-SET 0x{second.status:04X}" if second is not None else ""),
                 "PS3.4 F.7.2")


async def _commitment(probe, stored: list) -> None:
    name = "storage commitment of the stored objects"
    if not probe.accepted(STORAGE_COMMITMENT_PUSH_MODEL):
        probe.record("writes", name, NOT_SUPPORTED, "SOP class not accepted", "PS3.4 J.3")
        return
    if not stored:
        probe.record("writes", name, NOT_SUPPORTED, "nothing was stored", "PS3.4 J.3")
        return
    try:
        result = await commit(probe.host, probe.port, probe.calling, probe.called, stored,
                              probe.timeout, listen_port=probe.listen_port)
    except AssociationError as error:
        probe.record("writes", name, FAIL, str(error), "PS3.4 J.3")
        return
    ok = result.status == 0 and len(result.committed) == len(stored) and not result.failed
    probe.record("writes", name, PASS if ok else FAIL,
                 f"N-ACTION 0x{result.status:04X}; {len(result.committed)} committed, "
                 f"{len(result.failed)} failed, report on the {result.delivered_on or '-'}",
                 "PS3.4 J.3")
