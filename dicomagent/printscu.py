"""Basic Grayscale Print Management SCU: ``dicomagent print`` (PS3.4 Annex H, SCU side).

One print job is one association and the sequence of PS3.4 H.2 (Figure H.2-1):

1. Printer N-GET: Printer Status; FAILURE stops the job before anything is created;
2. Basic Film Session N-CREATE (copies, priority, medium, destination, label);
3. Presentation LUT N-CREATE, when the printer's configuration names a shape;
4. per film of C×R images: Basic Film Box N-CREATE (Image Display Format
   ``STANDARD\\C,R``, seed 3.1.2.9.3), a Basic Grayscale Image Box N-SET per image with a
   Preformatted Grayscale Image Sequence, a Basic Annotation Box N-SET for the job's
   annotation, and, when printing film by film, N-ACTION print and N-DELETE of the film box;
5. with ``print_level = "film_session"``, one N-ACTION print on the film session;
6. N-DELETE of what is left (Presentation LUT, film session), then A-RELEASE.

A failure status at any step, or a Printer N-EVENT-REPORT of a FAILURE on the
association, stops the job: what was created is deleted, newest first, and the
association released. Warning statuses and printer warnings are collected for the user.

References
----------
PS3.4 H.2 (overview), H.3 (Meta SOP classes, Table H.3-1), H.4.1 (Basic Film Session),
H.4.2 (Basic Film Box), H.4.3.1 (Basic Grayscale Image Box), H.4.4 (Basic Annotation
Box), H.4.6 (Printer), H.4.9 (Presentation LUT); PS3.3 C.13 (print modules); seed
3.1.2.9, Table 11.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy
import pydicom

from dicomagent.association import AssociationError, RequestorAssociation, associate
from dicomagent.config import PrintSettings
from dicomagent.dimse.commands import (NO_DATA_SET, N_ACTION_RQ, N_CREATE_RQ,
                                       N_DELETE_RQ, N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP,
                                       N_GET_RQ, N_SET_RQ)
from dicomagent.dimse.status import (NO_SUCH_EVENT_TYPE, NO_SUCH_SOP_CLASS, StatusCategory,
                                     category)
from dicomagent.render import Rendered
from dicomagent.transcode import UNCOMPRESSED, decode, encode
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.ul.states import State
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger("dicomagent.print")

# --- PS3.4 H.3 / PS3.6 Annex A: SOP classes and the well-known Printer instance ------------------

#: Seed Table 11: the one Meta SOP Class we propose (PS3.4 H.3.1, Table H.3-1).
BASIC_GRAYSCALE_PRINT_MANAGEMENT_META = "1.2.840.10008.5.1.1.9"
BASIC_FILM_SESSION = "1.2.840.10008.5.1.1.1"
BASIC_FILM_BOX = "1.2.840.10008.5.1.1.2"
BASIC_GRAYSCALE_IMAGE_BOX = "1.2.840.10008.5.1.1.4"
PRINTER = "1.2.840.10008.5.1.1.16"
#: PS3.4 H.4.6: the Printer SOP Instance, well-known.
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
PRINT_JOB = "1.2.840.10008.5.1.1.14"
#: Optional SOP classes, negotiated on their own contexts (seed 3.1.2.9.3).
BASIC_ANNOTATION_BOX = "1.2.840.10008.5.1.1.15"
PRESENTATION_LUT = "1.2.840.10008.5.1.1.23"

#: PS3.4 H.4.1.2.4.1, H.4.2.2.4.1: Action Type ID of "Print".
ACTION_PRINT = 1

#: PS3.4 H.4.6.2.1: Printer N-EVENT-REPORT Event Type IDs.
PRINTER_EVENTS = {1: "NORMAL", 2: "WARNING", 3: "FAILURE"}

#: PS3.4 H.4 status codes of the print SOP classes (and the general ones print SCPs send).
PRINT_STATUSES = {
    0x0105: "no such attribute",
    0x0106: "invalid attribute value",
    0x0107: "attribute list error",
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0116: "attribute value out of range",
    0x0118: "no such SOP class",
    0x0120: "missing attribute",
    0x0121: "missing attribute value",
    0x0213: "resource limitation",
    0xB600: "memory allocation not supported",
    0xB601: "film session printing (collation) is not supported",
    0xB602: "film session holds no image box SOP instances (empty page)",
    0xB603: "film box holds no image box SOP instances (empty page)",
    0xB604: "image larger than the image box: demagnified",
    0xB605: "requested min or max density outside the printer's range",
    0xB609: "image larger than the image box: cropped",
    0xB60A: "image larger than the image box: decimated",
    0xC600: "film session holds no film box SOP instances",
    0xC601: "print queue full (film session)",
    0xC602: "print queue full (film box)",
    0xC603: "image larger than the image box",
    0xC604: "image position collision",
    0xC605: "insufficient memory in the printer to store the image",
    0xC613: "combined print image larger than the image box",
    0xC616: "an existing film box has not been printed",
}

#: PS3.3 C.13.3 (Film Size ID) sizes that are not "<w>INX<h>IN" or "<w>CMX<h>CM", in mm.
_NAMED_FILM_SIZES = {"A4": (210.0, 297.0), "A3": (297.0, 420.0)}
_FILM_SIZE = re.compile(r"(\d+(?:_\d+)?)(IN|CM)X(\d+(?:_\d+)?)(IN|CM)")


def film_size_mm(film_size_id: str) -> tuple[float, float] | None:
    """(width, height) in mm of a PS3.3 C.13.3 Film Size ID, portrait; None if unknown."""
    if film_size_id in _NAMED_FILM_SIZES:
        return _NAMED_FILM_SIZES[film_size_id]
    match = _FILM_SIZE.fullmatch(film_size_id)
    if match is None:
        return None

    def mm(number: str, unit: str) -> float:
        return float(number.replace("_", ".")) * (25.4 if unit == "IN" else 10.0)

    return mm(match.group(1), match.group(2)), mm(match.group(3), match.group(4))


def image_box_size(settings: PrintSettings, columns: int, rows: int) -> tuple[int, int]:
    """(columns, rows) in pixels of one image box of a ``STANDARD\\C,R`` film.

    Local extension: PS3.4 does not tell the SCU the printer's pixel size; we render at
    ``resolution_dpi`` and leave the last magnification to the printer.
    """
    width, height = film_size_mm(settings.film_size_id)
    if settings.film_orientation == "LANDSCAPE":
        width, height = height, width
    dots_per_mm = settings.resolution_dpi / 25.4
    return (max(1, int(width * dots_per_mm) // columns),
            max(1, int(height * dots_per_mm) // rows))


# --- the data sets of PS3.4 H.4 -------------------------------------------------------------------

def _reference(sop_class: str, sop_instance: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def film_session_attributes(settings: PrintSettings) -> pydicom.Dataset:
    """PS3.4 H.4.1.2.1.1 (Table H.4-1): the Basic Film Session N-CREATE attributes."""
    ds = pydicom.Dataset()
    ds.NumberOfCopies = str(settings.number_of_copies)
    ds.PrintPriority = settings.priority
    if settings.medium_type:
        ds.MediumType = settings.medium_type
    if settings.film_destination:
        ds.FilmDestination = settings.film_destination
    if settings.film_session_label:
        ds.FilmSessionLabel = settings.film_session_label
    return ds


def presentation_lut_attributes(settings: PrintSettings) -> pydicom.Dataset:
    """PS3.4 H.4.9.2.1.1: Presentation LUT Shape (PS3.3 C.11.6: IDENTITY or LIN OD)."""
    ds = pydicom.Dataset()
    ds.PresentationLUTShape = settings.presentation_lut_shape
    return ds


def film_box_attributes(settings: PrintSettings, columns: int, rows: int, film_session: str,
                        presentation_lut: str | None, annotations: bool) -> pydicom.Dataset:
    """PS3.4 H.4.2.2.1.1 (Table H.4-4): the Basic Film Box N-CREATE attributes.

    An empty configuration value (0 for the densities) is left out: the printer's default.
    """
    ds = pydicom.Dataset()
    ds.ImageDisplayFormat = f"STANDARD\\{columns},{rows}"
    ds.ReferencedFilmSessionSequence = [_reference(BASIC_FILM_SESSION, film_session)]
    ds.FilmOrientation = settings.film_orientation
    ds.FilmSizeID = settings.film_size_id
    for keyword, value in (("MagnificationType", settings.magnification_type),
                           ("BorderDensity", settings.border_density),
                           ("EmptyImageDensity", settings.empty_image_density),
                           ("Trim", settings.trim),
                           ("ConfigurationInformation", settings.configuration_information)):
        if value:
            setattr(ds, keyword, value)
    if settings.min_density:
        ds.MinDensity = settings.min_density
    if settings.max_density:
        ds.MaxDensity = settings.max_density
    if presentation_lut is not None:
        ds.ReferencedPresentationLUTSequence = [_reference(PRESENTATION_LUT, presentation_lut)]
    if annotations:
        ds.AnnotationDisplayFormatID = settings.annotation_display_format_id
    return ds


def image_box_attributes(position: int, image: Rendered, transfer_syntax: str) -> pydicom.Dataset:
    """PS3.4 H.4.3.1.2.1.1 (Table H.4-8): Image Box Position and the Preformatted
    Grayscale Image Sequence (PS3.3 C.13.5.1): MONOCHROME2, unsigned, 8 bits in 8 or
    12 bits in 16, square pixels.

    The pixel bytes are written in the byte order of the presentation context (OW is
    raw bytes to the encoder).
    """
    item = pydicom.Dataset()
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = "MONOCHROME2"
    item.Rows = image.rows
    item.Columns = image.columns
    item.PixelAspectRatio = [1, 1]
    item.BitsAllocated = 8 if image.bits == 8 else 16
    item.BitsStored = image.bits
    item.HighBit = image.bits - 1
    item.PixelRepresentation = 0
    if image.bits == 8:
        data = image.pixels.astype(numpy.uint8).tobytes()
        item.add_new(0x7FE00010, "OB", data + b"\x00" * (len(data) & 1))
    else:
        little = UNCOMPRESSED.get(transfer_syntax, (False, True))[1]
        item.add_new(0x7FE00010, "OW",
                     image.pixels.astype("<u2" if little else ">u2").tobytes())
    ds = pydicom.Dataset()
    ds.ImageBoxPosition = position
    ds.BasicGrayscaleImageSequence = [item]
    return ds


def annotation_attributes(position: int, text: str) -> pydicom.Dataset:
    """PS3.4 H.4.4.2.1.1: Annotation Position and Text String (LO: 64 characters)."""
    ds = pydicom.Dataset()
    ds.AnnotationPosition = position
    ds.TextString = text[:64]
    return ds


# --- the job ------------------------------------------------------------------------------------------

class PrintFailed(Exception):
    """The job stopped: a failure status, a printer FAILURE, an image that cannot be rendered."""


@dataclass
class PrintResult:
    films: int = 0
    images: int = 0
    #: One line per warning status, printer warning, or optional SOP class the printer refused.
    warnings: list[str] = field(default_factory=list)
    printer_status: str = ""
    printer_status_info: str = ""


def describe_status(status: int) -> str:
    text = PRINT_STATUSES.get(status)
    return f"0x{status:04X}{' (' + text + ')' if text else ''}"


class PrintJob:
    """One print job on one association (PS3.4 H.2): the steps, the objects created, the
    printer's events.

    ``images`` is a list of callables ``render(box) -> Rendered``; each is called when its
    image box is filled, so only one film's images are in memory at a time.
    """

    def __init__(self, association: RequestorAssociation, settings: PrintSettings,
                 layout: tuple[int, int], annotation: str | None, progress=None):
        self.association = association
        self.settings = settings
        self.columns, self.rows = layout
        self.annotation = annotation
        self.progress = progress or (lambda result: None)
        self.result = PrintResult()
        #: (SOP class, SOP instance) of each object we created, oldest first.
        self.created: list[tuple[str, str]] = []
        self.printer_failure: str | None = None
        self.meta = association.context_for(BASIC_GRAYSCALE_PRINT_MANAGEMENT_META)
        association.handlers[(N_EVENT_REPORT_RQ, BASIC_GRAYSCALE_PRINT_MANAGEMENT_META)] = \
            self.on_event_report

    def warn(self, text: str) -> None:
        """Keep a warning for the user (the CLI prints them at the end)."""
        log.info("%s", text)
        self.result.warnings.append(text)

    # --- PS3.4 H.4.6.2.1: Printer N-EVENT-REPORT ---------------------------------------------

    def on_event_report(self, association, context, received) -> None:
        """Answer the printer's event; a FAILURE stops the job at its next step."""
        request: N_EVENT_REPORT_RQ = received.command
        if association.connection.state is not State.Sta6:
            # PS3.8 Table 9-10: no P-DATA from us after our A-RELEASE-RQ (Sta7).
            return
        status = 0x0000
        info = ""
        if request.AffectedSOPClassUID == PRINTER and request.EventTypeID in PRINTER_EVENTS:
            try:
                ds = decode(received.data_set or b"", context.transfer_syntax)
                info = str(ds.get("PrinterStatusInfo", "") or "")
            except Exception:  # noqa: BLE001 - the event counts even if its data set does not
                info = ""
            event = PRINTER_EVENTS[request.EventTypeID]
            text = f"printer event {event}{': ' + info if info else ''}"
            if event == "FAILURE":
                self.printer_failure = text
                log.info("%s", text)
            elif event == "WARNING":
                self.warn(text)
            else:
                log.info("%s", text)
        elif request.AffectedSOPClassUID == PRINTER:
            status = NO_SUCH_EVENT_TYPE
        elif request.AffectedSOPClassUID != PRINT_JOB:
            status = NO_SUCH_SOP_CLASS
        association.send_message(context.context_id, N_EVENT_REPORT_RSP(
            AffectedSOPClassUID=request.AffectedSOPClassUID,
            MessageIDBeingRespondedTo=request.MessageID, Status=status,
            AffectedSOPInstanceUID=request.AffectedSOPInstanceUID,
            EventTypeID=request.EventTypeID))

    # --- one request, its status ------------------------------------------------------------------

    async def _request(self, step: str, context, command,
                       data_set=None) -> tuple[object, pydicom.Dataset]:
        """Send ``command``; return the response command and its data set (empty if none).

        A failure status raises ``PrintFailed`` naming the step; a warning is kept.
        """
        payload = None if data_set is None else encode(data_set, context.transfer_syntax)
        received = await self.association.request(context.context_id, command, payload)
        rsp = received.command
        kind = category(rsp.Status)
        comment = f": {rsp.ErrorComment}" if rsp.ErrorComment else ""
        if kind is StatusCategory.WARNING:
            self.warn(f"{step}: warning {describe_status(rsp.Status)}{comment}")
        elif kind is not StatusCategory.SUCCESS:
            raise PrintFailed(f"{step} failed: status {describe_status(rsp.Status)}{comment}")
        ds = decode(received.data_set, context.transfer_syntax) if received.data_set \
            else pydicom.Dataset()
        return rsp, ds

    def _check_printer(self, step: str) -> None:
        """Stop before ``step`` once the printer reported a FAILURE (PS3.4 H.4.6.2.1)."""
        if self.printer_failure:
            raise PrintFailed(f"stopped before {step}: {self.printer_failure}")

    def _id(self) -> int:
        return self.association.next_message_id()

    async def create(self, step: str, context, sop_class: str,
                     attributes) -> tuple[str, pydicom.Dataset]:
        """N-CREATE (PS3.7 §10.1.5): the instance UID the SCP gave, and its attributes.

        The new instance is remembered for the clean-up.
        """
        self._check_printer(step)
        rsp, ds = await self._request(step, context, N_CREATE_RQ(
            AffectedSOPClassUID=sop_class, MessageID=self._id()), attributes)
        if not rsp.AffectedSOPInstanceUID:
            raise PrintFailed(f"{step}: the N-CREATE-RSP names no Affected SOP Instance UID")
        self.created.append((sop_class, rsp.AffectedSOPInstanceUID))
        return rsp.AffectedSOPInstanceUID, ds

    async def set(self, step: str, context, sop_class: str, instance: str, attributes) -> None:
        """N-SET (PS3.7 §10.1.3)."""
        self._check_printer(step)
        await self._request(step, context, N_SET_RQ(
            RequestedSOPClassUID=sop_class, MessageID=self._id(),
            RequestedSOPInstanceUID=instance), attributes)

    async def print_action(self, step: str, sop_class: str, instance: str) -> None:
        """N-ACTION Print (PS3.4 H.4.1.2.4, H.4.2.2.4)."""
        self._check_printer(step)
        await self._request(step, self.meta, N_ACTION_RQ(
            RequestedSOPClassUID=sop_class, MessageID=self._id(),
            CommandDataSetType=NO_DATA_SET, RequestedSOPInstanceUID=instance,
            ActionTypeID=ACTION_PRINT))

    async def delete(self, sop_class: str, instance: str) -> None:
        """N-DELETE (PS3.7 §10.1.6) of one object we created."""
        context = self._context_of(sop_class)
        self.created.remove((sop_class, instance))
        await self._request(f"N-DELETE {_NAMES[sop_class]}", context, N_DELETE_RQ(
            RequestedSOPClassUID=sop_class, MessageID=self._id(),
            RequestedSOPInstanceUID=instance))

    def _context_of(self, sop_class: str):
        if sop_class == PRESENTATION_LUT:
            return self.association.context_for(PRESENTATION_LUT)
        return self.meta

    # --- the steps of PS3.4 H.2 ----------------------------------------------------------------------

    async def printer_status(self) -> None:
        """Printer N-GET (PS3.4 H.4.6.2.2): Printer Status (2110,0010) and Printer Status
        Info (2110,0020). FAILURE stops the job; WARNING is reported."""
        _, ds = await self._request("Printer N-GET", self.meta, N_GET_RQ(
            RequestedSOPClassUID=PRINTER, MessageID=self._id(),
            RequestedSOPInstanceUID=PRINTER_INSTANCE,
            AttributeIdentifierList=(0x21100010, 0x21100020)))
        status = str(ds.get("PrinterStatus", "") or "")
        info = str(ds.get("PrinterStatusInfo", "") or "")
        self.result.printer_status, self.result.printer_status_info = status, info
        if status == "FAILURE":
            raise PrintFailed(f"the printer's status is FAILURE{' (' + info + ')' if info else ''}"
                              f": nothing was printed")
        if status == "WARNING":
            self.warn(f"the printer's status is WARNING{' (' + info + ')' if info else ''}")

    async def run(self, images: list) -> PrintResult:
        """The whole job; on any failure the created objects are deleted, newest first."""
        try:
            await self._run(images)
        except (PrintFailed, AssociationError):
            await self.clean_up()
            raise
        except Exception as error:
            await self.clean_up()
            raise PrintFailed(str(error) or type(error).__name__) from error
        return self.result

    async def _run(self, images: list) -> None:
        settings = self.settings
        await self.printer_status()
        session, _ = await self.create("Basic Film Session N-CREATE", self.meta,
                                       BASIC_FILM_SESSION, film_session_attributes(settings))
        plut = None
        if settings.presentation_lut_shape and self._accepted(PRESENTATION_LUT):
            plut, _ = await self.create("Presentation LUT N-CREATE",
                                        self.association.context_for(PRESENTATION_LUT),
                                        PRESENTATION_LUT, presentation_lut_attributes(settings))
        annotate = bool(self.annotation) and self._accepted(BASIC_ANNOTATION_BOX)
        per_film = self.columns * self.rows
        films = [images[i:i + per_film] for i in range(0, len(images), per_film)]
        for number, film in enumerate(films, 1):
            film_box = await self.fill_film(number, len(films), film, session, plut, annotate)
            if settings.print_level == "film_box":
                await self.print_action(f"film {number}/{len(films)}: Basic Film Box N-ACTION "
                                        f"print", BASIC_FILM_BOX, film_box)
                await self.delete(BASIC_FILM_BOX, film_box)
            self.result.films += 1
        if settings.print_level == "film_session":
            await self.print_action("Basic Film Session N-ACTION print", BASIC_FILM_SESSION,
                                    session)
        # PS3.4 H.4.1.2.3: the film session's N-DELETE takes its film boxes with it; we
        # delete each object we created anyway, newest first.
        for sop_class, instance in reversed(list(self.created)):
            await self.delete(sop_class, instance)
        if self.printer_failure:
            self.warn(f"after the films were printed: {self.printer_failure}")

    async def fill_film(self, number: int, total: int, film: list, session: str,
                        plut_uid: str | None, annotate: bool) -> str:
        """Basic Film Box N-CREATE, then an Image Box N-SET per image and the annotation."""
        step = f"film {number}/{total}"
        film_box, box = await self.create(
            f"{step}: Basic Film Box N-CREATE", self.meta, BASIC_FILM_BOX,
            film_box_attributes(self.settings, self.columns, self.rows, session, plut_uid,
                                annotate))
        image_boxes = list(box.get("ReferencedImageBoxSequence", []) or [])
        if len(image_boxes) != self.columns * self.rows:
            raise PrintFailed(f"{step}: the printer created {len(image_boxes)} image boxes for "
                              f"STANDARD\\{self.columns},{self.rows}")
        size = image_box_size(self.settings, self.columns, self.rows)
        # PS3.3 C.13.4: the Referenced Image Box Sequence lists the boxes in the order of
        # their Image Box Position (1 is top left, then left to right, top to bottom).
        for position, (render, reference) in enumerate(zip(film, image_boxes), 1):
            image = render(size)
            await self.set(f"{step}: Basic Grayscale Image Box N-SET (position {position})",
                           self.meta, reference.ReferencedSOPClassUID or BASIC_GRAYSCALE_IMAGE_BOX,
                           reference.ReferencedSOPInstanceUID,
                           image_box_attributes(position, image, self.meta.transfer_syntax))
            self.result.images += 1
            self.progress(self.result)
        if annotate:
            await self.annotate(step, box)
        return film_box

    async def annotate(self, step: str, box: pydicom.Dataset) -> None:
        """Basic Annotation Box N-SET (PS3.4 H.4.4) of the box at ``annotation_position``."""
        boxes = list(box.get("ReferencedBasicAnnotationBoxSequence", []) or [])
        position = self.settings.annotation_position
        if len(boxes) < position:
            self.warn(f"{step}: the printer created {len(boxes)} annotation boxes for "
                      f"Annotation Display Format ID "
                      f"{self.settings.annotation_display_format_id!r}; no annotation printed")
            return
        reference = boxes[position - 1]
        await self.set(f"{step}: Basic Annotation Box N-SET",
                       self.association.context_for(BASIC_ANNOTATION_BOX),
                       reference.ReferencedSOPClassUID or BASIC_ANNOTATION_BOX,
                       reference.ReferencedSOPInstanceUID,
                       annotation_attributes(position, self.annotation))

    def _accepted(self, sop_class: str) -> bool:
        return any(c.abstract_syntax == sop_class for c in self.association.contexts.values())

    async def clean_up(self) -> None:
        """N-DELETE what is left, newest first; failures here are logged, not raised."""
        for sop_class, instance in reversed(list(self.created)):
            if self.association.ended.done():
                return
            try:
                await self.delete(sop_class, instance)
            except (PrintFailed, AssociationError) as error:
                log.warning("clean-up: %s", error)


_NAMES = {BASIC_FILM_SESSION: "Basic Film Session", BASIC_FILM_BOX: "Basic Film Box",
          PRESENTATION_LUT: "Presentation LUT"}


def proposed_contexts(settings: PrintSettings, annotation: str | None) -> list[ProposedContext]:
    """Seed 3.1.2.9.2 (Table 35): the Meta SOP Class, and the optional SOP classes the job
    uses, each on its own context with the seed's Table 12 transfer syntaxes."""
    contexts = [ProposedContext(BASIC_GRAYSCALE_PRINT_MANAGEMENT_META,
                                UNCOMPRESSED_TRANSFER_SYNTAXES)]
    if settings.presentation_lut_shape:
        contexts.append(ProposedContext(PRESENTATION_LUT, UNCOMPRESSED_TRANSFER_SYNTAXES))
    if annotation:
        contexts.append(ProposedContext(BASIC_ANNOTATION_BOX, UNCOMPRESSED_TRANSFER_SYNTAXES))
    return contexts


async def print_images(host: str, port: int, calling: str, called: str,
                       settings: PrintSettings, images: list, layout: tuple[int, int],
                       annotation: str | None = None, timeout: float = 30.0,
                       progress=None) -> PrintResult:
    """Print ``images`` (callables ``render(box) -> Rendered``), C×R per film.

    Raises ``AssociationError`` (no connection, rejected, aborted) or ``PrintFailed``.
    """
    association = await associate(host, port, calling, called,
                                  proposed_contexts(settings, annotation),
                                  artim_timeout=timeout, dimse_timeout=timeout,
                                  network_timeout=timeout)
    try:
        if not any(c.abstract_syntax == BASIC_GRAYSCALE_PRINT_MANAGEMENT_META
                   for c in association.contexts.values()):
            raise PrintFailed("the printer accepted no Basic Grayscale Print Management "
                              "Meta SOP Class context: nothing was printed")
        job = PrintJob(association, settings, layout, annotation, progress)
        if settings.presentation_lut_shape and not job._accepted(PRESENTATION_LUT):
            job.warn("the printer refused the Presentation LUT SOP Class: printing without "
                     "a Presentation LUT")
        if annotation and not job._accepted(BASIC_ANNOTATION_BOX):
            job.warn("the printer refused the Basic Annotation Box SOP Class: printing "
                     "without annotations")
        return await job.run(images)
    finally:
        await association.release()


# --- where the images come from --------------------------------------------------------------------

def archive_path(data_dir: str, sop_instance_uid: str) -> str | None:
    """The file of an instance of the local archive (read-only look-up in its index)."""
    import os
    import sqlite3
    index = os.path.join(data_dir, "index.sqlite")
    if not os.path.exists(index):
        return None
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT path FROM instances WHERE SOPInstanceUID = ?",
                         (sop_instance_uid,)).fetchone()
    finally:
        db.close()
    return None if row is None else os.path.join(data_dir, row[0])


def find_images(items: list[str], data_dir: str) -> tuple[list[str], list[str]]:
    """The files to print, in order: each PATH (a folder: its DICOM files, sorted) or SOP
    Instance UID of the archive in ``data_dir``; and a message per item not found."""
    import os
    from dicomagent.store import scan
    paths, problems = [], []
    for item in items:
        if os.path.exists(item):
            files, skipped = scan([item])
            paths += [f.path for f in files]
            problems += [f"{path}: {reason}" for path, reason in skipped
                         if not os.path.isdir(item)]
        else:
            path = archive_path(data_dir, item)
            if path is None:
                problems.append(f"{item}: neither a file nor a SOP Instance UID of the "
                                f"archive in {data_dir}")
            else:
                paths.append(path)
    return paths, problems


def file_renderer(path: str, bits: int, gsps: pydicom.Dataset | None = None):
    """``render(box) -> Rendered`` for the image in ``path``, read when it is needed."""
    from dicomagent.render import RenderError, render

    def render_file(box: tuple[int, int]) -> Rendered:
        try:
            return render(pydicom.dcmread(path), box, bits, gsps)
        except (RenderError, OSError, pydicom.errors.InvalidDicomError) as error:
            raise PrintFailed(f"{path}: {error}") from None

    return render_file
