"""Basic Grayscale Print Management SCU (``dicomagent print``), against real print SCPs.

What is proved here (STYLE.md, "Tests": interop is the proof, never skipped):

- against DCMTK ``dcmprscp`` (configured by a ``dcmpstat.cfg`` of the test's own, on
  loopback): 1×1 and 2×2 films, 8 and 12 bits, with and without a Presentation LUT, an
  image taken from the archive by SOP Instance UID, a Grayscale Softcopy Presentation
  State; the test reads what dcmprscp stored (Stored Print and Hardcopy Grayscale Image
  objects) and checks the layout, the number of image boxes, the film attributes, the
  Presentation LUT, and that every printed pixel equals the rendering computed here,
  independently, from PS3.3 C.11 (within rounding). dcmprscp does not offer the Basic
  Annotation Box SOP Class: the CLI warns and prints without annotations;
- a printer that rejects the film size (0106 on the film box N-CREATE) and one that is
  down: a clear message, a non-zero exit code, nothing stored, the film session deleted;
- against a print SCP written here on dicomagent's own Upper Layer: the annotation text
  and position, printing at film session level, warning statuses (B605) and printer
  WARNING events reported, a printer in FAILURE at the N-GET (nothing created), a
  FAILURE event in the middle of a job (the job stops, everything created is deleted).

References
----------
PS3.4 Annex H (H.2 sequence; H.4.1 film session, H.4.2 film box, H.4.3.1 image box, H.4.4
annotation box, H.4.6 printer, H.4.9 Presentation LUT); PS3.3 C.11 (grayscale pipeline),
C.10.4 / C.10.6 (displayed area, spatial transformation), C.13 (print modules); seed
3.1.2.9, Table 11.
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomagent.association import AcceptorAssociation
from dicomagent.config import Config
from dicomagent.dimse.commands import (DATA_SET_PRESENT, N_ACTION_RQ, N_ACTION_RSP,
                                       N_CREATE_RQ, N_CREATE_RSP, N_DELETE_RQ, N_DELETE_RSP,
                                       N_EVENT_REPORT_RQ, N_GET_RQ, N_GET_RSP, N_SET_RQ,
                                       N_SET_RSP)
from dicomagent.printscu import (BASIC_ANNOTATION_BOX, BASIC_FILM_BOX, BASIC_FILM_SESSION,
                                 BASIC_GRAYSCALE_IMAGE_BOX, BASIC_GRAYSCALE_PRINT_MANAGEMENT_META,
                                 PRESENTATION_LUT, PRINTER, PRINTER_INSTANCE)
from dicomagent.transcode import UNCOMPRESSED, decode, encode
from dicomagent.uids import EXPLICIT_VR_BIG_ENDIAN
from dicomagent.ul.negotiation import (AbstractSyntaxSupport, AcceptorPolicy, accepted_contexts,
                                       negotiate)
from nodes import HOST, dicomagent_cmd, free_port, require_binary, run, start_listening

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
STORED_PRINT = "1.2.840.10008.5.1.1.27"
HARDCOPY_GRAYSCALE_IMAGE = "1.2.840.10008.5.1.1.29"

#: The film of every job here: 8 x 10 inch at 20 dpi, so a portrait film is 160 x 200
#: pixels and the images stay small.
DPI = 20


# --- test images ---------------------------------------------------------------------------------

def write_image(path: Path, rows: int = 48, columns: int = 64, *, photometric="MONOCHROME2",
                seed: int = 0, window=(40.0, 400.0), pixel_spacing=None) -> Path:
    """A 12-bit CT image: a gradient and a few random squares, Rescale Intercept -1024."""
    rng = numpy.random.default_rng(seed)
    y, x = numpy.mgrid[0:rows, 0:columns]
    values = (x * 3000 // columns + y * 15 + seed * 37).astype(numpy.int64)
    for _ in range(4):
        r, c = rng.integers(0, rows - 8), rng.integers(0, columns - 8)
        values[r:r + 8, c:c + 8] = rng.integers(0, 4096)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, uid
    ds.PatientName, ds.PatientID, ds.Modality = "PRINT^TEST", "PRINT1", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    ds.PixelData = (values % 4096).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_gsps(path: Path, image: pydicom.Dataset) -> Path:
    """A GSPS for ``image``: its own window, INVERSE, horizontal flip, 90 degrees, and a
    displayed area cut out of the image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = GSPS_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = GSPS_STORAGE, uid, "PR"
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    voi = Dataset()
    voi.ReferencedImageSequence = [reference]
    voi.WindowCenter, voi.WindowWidth = 500.0, 1500.0
    ds.SoftcopyVOILUTSequence = [voi]
    area = Dataset()
    area.DisplayedAreaTopLeftHandCorner = [5, 3]            # column \ row
    area.DisplayedAreaBottomRightHandCorner = [60, 40]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelSpacing = [1.0, 1.0]
    ds.DisplayedAreaSelectionSequence = [area]
    ds.ImageRotation, ds.ImageHorizontalFlip = 90, "Y"
    ds.PresentationLUTShape = "INVERSE"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- the rendering, computed independently from PS3.3 C.11 ----------------------------------------

def expected_print(path: Path, box: tuple[int, int], bits: int, gsps: Path | None = None,
                   ) -> numpy.ndarray:
    """What the printed pixels must be, written from the standard without ``render.py``:
    rescale (C.11.1), the LINEAR window (C.11.2.1.2.1), MONOCHROME1 or the GSPS's
    Presentation LUT Shape, the GSPS's displayed area, flip and rotation, then a
    bilinear fit into ``box`` = (columns, rows) with square pixels, rounded half up."""
    ds = pydicom.dcmread(path)
    state = pydicom.dcmread(gsps) if gsps else None
    source = state if state is not None else ds
    values = ds.pixel_array.astype(float) * float(source.RescaleSlope) \
        + float(source.RescaleIntercept)
    voi = state.SoftcopyVOILUTSequence[0] if state is not None else ds
    c, w = float(voi.WindowCenter), float(voi.WindowWidth)
    lower, upper = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    out = numpy.empty_like(values)
    for index, v in numpy.ndenumerate(values):
        out[index] = 0.0 if v <= lower else 1.0 if v > upper else \
            ((v - (c - 0.5)) / (w - 1) + 0.5)
    inverse = (state.PresentationLUTShape == "INVERSE") if state is not None \
        else ds.PhotometricInterpretation == "MONOCHROME1"
    if inverse:
        out = 1.0 - out
    row_spacing, column_spacing = (float(v) for v in ds.get("PixelSpacing", [1, 1]))
    if state is not None:
        area = state.DisplayedAreaSelectionSequence[0]
        (c0, r0), (c1, r1) = (area.DisplayedAreaTopLeftHandCorner,
                              area.DisplayedAreaBottomRightHandCorner)
        out = out[r0 - 1:r1, c0 - 1:c1]
        out = numpy.array([list(reversed(row)) for row in out])            # horizontal flip
        out = numpy.array([[out[len(out) - 1 - r][k] for r in range(len(out))]
                           for k in range(len(out[0]))])                      # 90 clockwise
        row_spacing = column_spacing = 1.0
    rows_in, columns_in = out.shape
    height, width = rows_in * row_spacing / column_spacing, columns_in
    scale = min(box[0] / width, box[1] / height)
    rows_out, columns_out = round(height * scale), round(width * scale)
    top = (1 << bits) - 1
    result = numpy.zeros((rows_out, columns_out), dtype=int)
    for i in range(rows_out):
        sy = min(max((i + 0.5) * rows_in / rows_out - 0.5, 0.0), rows_in - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, rows_in - 1), sy - y0
        for j in range(columns_out):
            sx = min(max((j + 0.5) * columns_in / columns_out - 0.5, 0.0), columns_in - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, columns_in - 1), sx - x0
            v = (out[y0, x0] * (1 - fx) * (1 - fy) + out[y0, x1] * fx * (1 - fy)
                 + out[y1, x0] * (1 - fx) * fy + out[y1, x1] * fx * fy)
            result[i, j] = math.floor(v * top + 0.5)
    return result


def assert_pixels(printed: numpy.ndarray, expected: numpy.ndarray, what: str) -> None:
    assert printed.shape == expected.shape, f"{what}: {printed.shape} != {expected.shape}"
    difference = numpy.abs(printed.astype(int) - expected.astype(int))
    assert difference.max() <= 1, f"{what}: differs by up to {difference.max()} at " \
                                  f"{numpy.unravel_index(difference.argmax(), difference.shape)}"


# --- dcmprscp ------------------------------------------------------------------------------------

@dataclass
class PrintSCP:
    """A DCMTK dcmprscp: where it listens, where it stores, what it logged."""

    port: int
    ae_title: str
    database: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stored(self) -> tuple[list[pydicom.Dataset], dict[str, pydicom.Dataset]]:
        """The Stored Print objects (one per printed film) and the Hardcopy Grayscale
        Images (one per image box N-SET), by SOP Instance UID."""
        prints, images = [], {}
        for path in sorted(self.database.iterdir()):
            if path.name == "index.dat":
                continue
            ds = pydicom.dcmread(path)
            if ds.SOPClassUID == STORED_PRINT:
                prints.append(ds)
            elif ds.SOPClassUID == HARDCOPY_GRAYSCALE_IMAGE:
                images[ds.SOPInstanceUID] = ds
        return prints, images


def dcmpstat_cfg(directory: Path, port: int, film_sizes: str) -> str:
    """A dcmpstat.cfg with one printer (the IHE "full" printer of DCMTK's printers.cfg,
    trimmed), its database under ``directory``."""
    return f"""[[GENERAL]]
[DATABASE]
Directory = {directory / 'db'}
[PRINT]
Directory = {directory / 'spool'}
DetailedLog = false
[LUT]
Directory = {directory / 'lut'}
[[COMMUNICATION]]
[PRINTER]
Aetitle = PRINTSCP
Description = dicomagent test printer
Hostname = localhost
Port = {port}
Type = LOCALPRINTER
BorderDensity = 150\\20\\BLACK\\WHITE
DisplayFormat = 1,1\\1,2\\2,1\\2,2\\2,3\\3,3
EmptyImageDensity = 20\\BLACK\\WHITE
FilmDestination = MAGAZINE\\PROCESSOR
FilmSizeID = {film_sizes}
ImplicitOnly = false
MagnificationType = REPLICATE\\BILINEAR\\CUBIC\\NONE
MaxDensity = 320
MaxPDU = 16384
MediumType = PAPER\\CLEAR FILM\\BLUE FILM
MinDensity = 20
PresentationLUTMatchRequired = false
PresentationLUTinFilmSession = false
Supports12Bit = true
SupportsDecimateCrop = false
SupportsImageSize = false
SupportsPresentationLUT = true
SupportsTrim = true
"""


@pytest.fixture
def dcmprscp(tmp_path):
    """``dcmprscp(film_sizes="8INX10IN\\\\14INX17IN")`` -> a running ``PrintSCP``."""
    binary = require_binary("dcmprscp")
    started: list[PrintSCP] = []

    def start(film_sizes: str = "8INX10IN\\14INX17IN") -> PrintSCP:
        directory = tmp_path / f"dcmprscp{len(started)}"
        for name in ("db", "spool", "lut"):
            (directory / name).mkdir(parents=True)
        config = directory / "dcmpstat.cfg"

        def command(port: int) -> list[str]:
            config.write_text(dcmpstat_cfg(directory, port, film_sizes))
            return [binary, "-c", str(config), "-p", "PRINTER", "-d"]

        log_path = directory / "dcmprscp.log"
        _, process, port = start_listening(command, None, log_path, directory)
        scp = PrintSCP(port, "PRINTSCP", directory / "db", log_path, process)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        if scp.process.poll() is None:
            scp.process.send_signal(signal.SIGTERM)
            scp.process.wait(10)
        assert scp.process.returncode in (0, -signal.SIGTERM), scp.log()


def write_config(tmp_path: Path, port: int, ae_title: str, **settings) -> Path:
    """A dicomagent.toml with the printer as [peers.film] and its [print.film] table."""
    lines = ["[agent]", 'ae_title = "PRINTSCU"', f'data_dir = "{tmp_path / "data"}"', "",
             "[peers.film]", f'ae_title = "{ae_title}"', f'host = "{HOST}"', f"port = {port}",
             "", "[print.film]", 'film_size_id = "8INX10IN"', 'medium_type = "PAPER"',
             'film_destination = "MAGAZINE"', f"resolution_dpi = {DPI}"]
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    path = tmp_path / "dicomagent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_cli(config: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return run(dicomagent_cmd("print", "-c", str(config), "film", *map(str, args)), timeout)


def film_layout(stored_print: pydicom.Dataset) -> tuple[str, dict[int, str]]:
    """(Image Display Format, {Image Box Position: Hardcopy image UID}) of a Stored Print."""
    film_box = stored_print.FilmBoxContentSequence[0]
    boxes = {int(item.ImageBoxPosition): item.ReferencedImageSequence[0].ReferencedSOPInstanceUID
             for item in stored_print.ImageBoxContentSequence}
    return str(film_box.ImageDisplayFormat), boxes


def hardcopy_pixels(ds: pydicom.Dataset, bits: int) -> numpy.ndarray:
    assert (ds.BitsStored, ds.PhotometricInterpretation) == (bits, "MONOCHROME2")
    return ds.pixel_array


# --- against dcmprscp ----------------------------------------------------------------------------

def test_one_by_one_8_bit_from_the_archive_without_annotation_box(tmp_path, dcmprscp):
    """1×1, 8 bits, no Presentation LUT; the image named by SOP Instance UID and found in
    the archive. dcmprscp rejects the Basic Annotation Box context: the CLI warns, prints
    without annotations, exits 0."""
    scp = dcmprscp()
    image = write_image(tmp_path / "ct.dcm", seed=1)
    config = write_config(tmp_path, scp.port, scp.ae_title, magnification_type="BILINEAR",
                          border_density="WHITE", trim="YES", number_of_copies=2)
    imported = run(dicomagent_cmd("import", "-c", str(config), str(image)))
    assert imported.returncode == 0, imported.stderr
    uid = pydicom.dcmread(image).SOPInstanceUID
    os.rename(image, tmp_path / "moved-away.dcm")             # only the archive has it now

    result = print_cli(config, uid, "--annotation", "not on this printer")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused the Basic Annotation Box SOP Class" in result.stderr
    assert "printed 1 images on 1 films" in result.stdout
    prints, images = scp.stored()
    assert len(prints) == 1 and len(images) == 1
    layout, boxes = film_layout(prints[0])
    assert layout == "STANDARD\\1,1" and list(boxes) == [1]
    film_box = prints[0].FilmBoxContentSequence[0]
    assert (film_box.FilmSizeID, film_box.FilmOrientation, film_box.MagnificationType,
            film_box.BorderDensity, film_box.Trim) == ("8INX10IN", "PORTRAIT", "BILINEAR",
                                                       "WHITE", "YES")
    assert "PresentationLUTContentSequence" not in prints[0]
    # 160 x 200 film, one box: the 64 x 48 image scaled by 2.5 to 160 x 120.
    printed = hardcopy_pixels(images[boxes[1]], 8)
    assert printed.shape == (120, 160)
    assert_pixels(printed, expected_print(tmp_path / "moved-away.dcm", (160, 200), 8), "1x1")


def test_two_by_two_12_bit_with_presentation_lut(tmp_path, dcmprscp):
    """2×2, 12 bits, Presentation LUT IDENTITY: five images make two films (4 + 1 image
    boxes); a MONOCHROME1 image and one with oblong pixels among them."""
    scp = dcmprscp()
    paths = [write_image(tmp_path / "a.dcm", seed=2),
             write_image(tmp_path / "b.dcm", seed=3, photometric="MONOCHROME1"),
             write_image(tmp_path / "c.dcm", seed=4, pixel_spacing=(2.0, 1.0)),
             write_image(tmp_path / "d.dcm", rows=64, columns=40, seed=5, window=(100, 1)),
             write_image(tmp_path / "e.dcm", seed=6, window=(-200, 900))]
    config = write_config(tmp_path, scp.port, scp.ae_title, bits_stored=12,
                          presentation_lut_shape="IDENTITY")

    result = print_cli(config, *paths, "--layout", "2,2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "printed 5 images on 2 films" in result.stdout
    prints, images = scp.stored()
    assert len(prints) == 2 and len(images) == 5
    layouts = sorted((film_layout(p) for p in prints), key=lambda f: -len(f[1]))
    assert [(fmt, sorted(boxes)) for fmt, boxes in layouts] == \
        [("STANDARD\\2,2", [1, 2, 3, 4]), ("STANDARD\\2,2", [1])]
    for stored_print in prints:
        (plut,) = stored_print.PresentationLUTContentSequence
        assert plut.PresentationLUTShape == "IDENTITY"
        assert stored_print.FilmBoxContentSequence[0].ReferencedPresentationLUTSequence[0] \
            .ReferencedSOPInstanceUID == plut.SOPInstanceUID
    # A 2x2 box of the 160 x 200 film is 80 x 100 pixels.
    order = [*(layouts[0][1][p] for p in (1, 2, 3, 4)), layouts[1][1][1]]
    for path, uid in zip(paths, order):
        assert_pixels(hardcopy_pixels(images[uid], 12), expected_print(path, (80, 100), 12),
                      path.name)
    # The oblong pixels: 48 rows of 2 mm under 64 columns of 1 mm fill the box's height.
    assert hardcopy_pixels(images[order[2]], 12).shape == (100, 67)


def test_presentation_state_landscape(tmp_path, dcmprscp):
    """A GSPS (its window, displayed area, flip, rotation, INVERSE) on a landscape 1×1
    film, 12 bits without Presentation LUT, printing at film session level."""
    scp = dcmprscp()
    image = write_image(tmp_path / "ct.dcm", seed=7)
    gsps = write_gsps(tmp_path / "gsps.dcm", pydicom.dcmread(image))
    config = write_config(tmp_path, scp.port, scp.ae_title, print_level="film_session")

    result = print_cli(config, image, "--gsps", gsps, "--orientation", "landscape",
                       "--bits", "12")

    assert result.returncode == 0, result.stdout + result.stderr
    prints, images = scp.stored()
    assert len(prints) == 1
    assert prints[0].FilmBoxContentSequence[0].FilmOrientation == "LANDSCAPE"
    _, boxes = film_layout(prints[0])
    # Landscape 8x10 at 20 dpi: 200 x 160; the 56 x 38 area, rotated, is 38 x 56 -> 109 x 160.
    printed = hardcopy_pixels(images[boxes[1]], 12)
    assert printed.shape == (160, 109)
    assert_pixels(printed, expected_print(image, (200, 160), 12, gsps), "GSPS")
    assert "N-ACTION RQ" in scp.log() and "BasicFilmSessionSOPClass" in scp.log()


def test_printer_rejects_the_film_size(tmp_path, dcmprscp):
    """A film size the printer does not have: the film box N-CREATE fails with 0106; the
    CLI says so, exits 1, deletes the film session; nothing is stored."""
    scp = dcmprscp(film_sizes="8INX10IN")
    image = write_image(tmp_path / "ct.dcm")
    config = write_config(tmp_path, scp.port, scp.ae_title)

    result = print_cli(config, image, "--film-size", "14INX17IN")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Basic Film Box N-CREATE failed: status 0x0106 (invalid attribute value)" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert scp.stored() == ([], {})
    log = scp.log()
    assert "illegal film size ID: '14INX17IN'" in log
    assert log.count("N-DELETE RQ") == 1 and "Association Release" in log


def test_printer_down(tmp_path):
    """Nothing listens on the printer's port: exit 3 and the reason."""
    config = write_config(tmp_path, free_port(), "NOBODY")
    result = print_cli(config, write_image(tmp_path / "ct.dcm"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot connect to 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_configuration_errors(tmp_path):
    """A [print.NAME] without its peer, a wrong enumerated value, an unknown printer."""
    config = write_config(tmp_path, 104, "X", bits_stored=10)
    result = print_cli(config, "1.2.3")
    assert result.returncode == 2 and "print.film.bits_stored: one of 8, 12" in result.stderr
    config.write_text(config.read_text().replace("[peers.film]", "[peers.other]")
                      .replace("bits_stored = 10", ""))
    result = print_cli(config, "1.2.3")
    assert result.returncode == 2 and "print.film: no [peers.film]" in result.stderr


# --- a print SCP on dicomagent's own Upper Layer --------------------------------------------------

@dataclass
class PrintedFilm:
    """What an N-ACTION print printed: the film box's attributes, each image box's
    pixels by position, each annotation box's text by position."""

    film_box: Dataset
    images: dict[int, numpy.ndarray]
    annotations: dict[int, str]


@dataclass
class PrintObject:
    sop_class: str
    attributes: Dataset
    parent: str | None = None
    transfer_syntax: str = ""


class OwnPrintSCP:
    """A Basic Grayscale Print Management SCP (with Presentation LUT and Basic Annotation
    Box) in the test's event loop, holding its SOP instances as PS3.4 H.4 describes them:
    a film box N-CREATE makes its image boxes and, with an Annotation Display Format ID,
    two annotation boxes; a film session N-DELETE takes its film boxes with it.

    ``printer_status``: what the Printer N-GET answers. ``statuses``: (command name, SOP
    class) -> the status to answer instead of 0000. ``event_after``: (n, event type ID,
    Printer Status Info): send a Printer N-EVENT-REPORT after the n-th image box N-SET.
    """

    def __init__(self, printer_status=("NORMAL", ""), statuses=None, event_after=None):
        self.config = Config()
        self.config.agent.ae_title = "OWNPRINT"
        supported = AbstractSyntaxSupport(scp=True)
        self.policy = AcceptorPolicy(ae_title="OWNPRINT", abstract_syntaxes={
            BASIC_GRAYSCALE_PRINT_MANAGEMENT_META: supported, PRESENTATION_LUT: supported,
            BASIC_ANNOTATION_BOX: supported})
        self.handlers = {}
        for uid in self.policy.abstract_syntaxes:
            for message, handler in ((N_GET_RQ, self.on_n_get), (N_CREATE_RQ, self.on_n_create),
                                     (N_SET_RQ, self.on_n_set), (N_ACTION_RQ, self.on_n_action),
                                     (N_DELETE_RQ, self.on_n_delete)):
                self.handlers[(message, uid)] = handler
        self.sinks: dict = {}
        self.send_cap = 1 << 20
        self.log_contexts = False
        self.printer_status = printer_status
        self.statuses = statuses or {}
        self.event_after = event_after
        self.objects: dict[str, PrintObject] = {}
        self.printed: list[PrintedFilm] = []
        #: (command name, SOP class) of every request, in order.
        self.requests: list[tuple[str, str]] = []
        self.image_box_sets = 0
        self.event_responses: list[int] = []
        #: The transfer syntaxes the image box N-SETs came in.
        self.transfer_syntaxes: set[str] = set()

    def negotiate(self, rq):
        response = negotiate(rq, self.policy)
        return response, accepted_contexts(rq, response.ac) if response.ac is not None else {}

    def provider_check(self, rq):
        return None

    def _answer(self, association, context, response_class, request, sop_class, instance,
                ds=None, default=0x0000):
        status = self.statuses.get((request.NAME, sop_class), default)
        association.send_message(context.context_id, response_class(
            AffectedSOPClassUID=sop_class, MessageIDBeingRespondedTo=request.MessageID,
            Status=status, AffectedSOPInstanceUID=instance,
            CommandDataSetType=DATA_SET_PRESENT if ds is not None else 0x0101),
            None if ds is None else encode(ds, context.transfer_syntax))
        return status

    def on_n_get(self, association, context, received) -> None:
        request = received.command
        self.requests.append((request.NAME, request.RequestedSOPClassUID))
        ds = Dataset()
        ds.PrinterStatus, ds.PrinterStatusInfo = self.printer_status
        self._answer(association, context, N_GET_RSP, request, PRINTER,
                     request.RequestedSOPInstanceUID, ds)

    def on_n_create(self, association, context, received) -> None:
        request = received.command
        sop_class = request.AffectedSOPClassUID
        self.requests.append((request.NAME, sop_class))
        attributes = decode(received.data_set or b"", context.transfer_syntax)
        if self.statuses.get((request.NAME, sop_class), 0) & 0xF000 in (0xA000, 0xC000):
            self._answer(association, context, N_CREATE_RSP, request, sop_class, None)
            return
        uid = generate_uid()
        parent = None
        response = None
        if sop_class == BASIC_FILM_BOX:
            parent = attributes.ReferencedFilmSessionSequence[0].ReferencedSOPInstanceUID
            columns, rows = attributes.ImageDisplayFormat.split("\\")[1].split(",")
            response = Dataset()
            response.ReferencedImageBoxSequence = [
                self._child(uid, BASIC_GRAYSCALE_IMAGE_BOX, position, context)
                for position in range(1, int(columns) * int(rows) + 1)]
            if "AnnotationDisplayFormatID" in attributes:
                response.ReferencedBasicAnnotationBoxSequence = [
                    self._child(uid, BASIC_ANNOTATION_BOX, position, context)
                    for position in (1, 2)]
        self.objects[uid] = PrintObject(sop_class, attributes, parent, context.transfer_syntax)
        self._answer(association, context, N_CREATE_RSP, request, sop_class, uid, response)

    def _child(self, parent: str, sop_class: str, position: int, context) -> Dataset:
        uid = generate_uid()
        self.objects[uid] = PrintObject(sop_class, Dataset(), parent, context.transfer_syntax)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, uid
        return item

    def on_n_set(self, association, context, received) -> None:
        request = received.command
        self.requests.append((request.NAME, request.RequestedSOPClassUID))
        target = self.objects[request.RequestedSOPInstanceUID]
        target.attributes = decode(received.data_set or b"", context.transfer_syntax)
        target.transfer_syntax = context.transfer_syntax
        self._answer(association, context, N_SET_RSP, request, request.RequestedSOPClassUID,
                     request.RequestedSOPInstanceUID)
        if request.RequestedSOPClassUID == BASIC_GRAYSCALE_IMAGE_BOX:
            self.image_box_sets += 1
            self.transfer_syntaxes.add(context.transfer_syntax)
            if self.event_after and self.event_after[0] == self.image_box_sets:
                asyncio.get_running_loop().create_task(self.report(association, context))

    async def report(self, association, context) -> None:
        """PS3.4 H.4.6.2.1: a Printer N-EVENT-REPORT on the job's association."""
        _, event_type, info = self.event_after
        ds = Dataset()
        ds.PrinterStatusInfo = info
        message_id = association.next_message_id()
        association.send_message(context.context_id, N_EVENT_REPORT_RQ(
            AffectedSOPClassUID=PRINTER, MessageID=message_id,
            AffectedSOPInstanceUID=PRINTER_INSTANCE, EventTypeID=event_type),
            encode(ds, context.transfer_syntax))
        received = await association.wait_response(message_id, 5.0)
        self.event_responses.append(received.command.Status)

    def on_n_action(self, association, context, received) -> None:
        request = received.command
        self.requests.append((request.NAME, request.RequestedSOPClassUID))
        uid = request.RequestedSOPInstanceUID
        boxes = [uid] if request.RequestedSOPClassUID == BASIC_FILM_BOX else \
            [u for u, o in self.objects.items() if o.parent == uid and o.sop_class ==
             BASIC_FILM_BOX]
        for box in boxes:
            self.printed.append(self._film(box))
        self._answer(association, context, N_ACTION_RSP, request, request.RequestedSOPClassUID,
                     uid)

    def _film(self, film_box: str) -> PrintedFilm:
        film = PrintedFilm(self.objects[film_box].attributes, {}, {})
        for child in self.objects.values():
            if child.parent != film_box or "ImageBoxPosition" not in child.attributes and \
                    "AnnotationPosition" not in child.attributes:
                continue
            if child.sop_class == BASIC_ANNOTATION_BOX:
                film.annotations[int(child.attributes.AnnotationPosition)] = \
                    str(child.attributes.TextString)
                continue
            item = child.attributes.BasicGrayscaleImageSequence[0]
            little = UNCOMPRESSED[child.transfer_syntax][1]
            dtype = "u1" if item.BitsAllocated == 8 else ("<u2" if little else ">u2")
            pixels = numpy.frombuffer(item.PixelData, dtype=dtype,
                                      count=item.Rows * item.Columns)
            film.images[int(child.attributes.ImageBoxPosition)] = \
                pixels.reshape(item.Rows, item.Columns)
        return film

    def on_n_delete(self, association, context, received) -> None:
        request = received.command
        self.requests.append((request.NAME, request.RequestedSOPClassUID))
        doomed = {request.RequestedSOPInstanceUID}
        while True:                               # PS3.4 H.4.1.2.3: the hierarchy goes too
            more = {u for u, o in self.objects.items() if o.parent in doomed} - doomed
            if not more:
                break
            doomed |= more
        for uid in doomed:
            self.objects.pop(uid, None)
        self._answer(association, context, N_DELETE_RSP, request, request.RequestedSOPClassUID,
                     request.RequestedSOPInstanceUID)


def print_against_own_scp(scp: OwnPrintSCP, config_settings: dict, tmp_path: Path,
                          *args) -> tuple[int, str, str]:
    """Run ``dicomagent print`` against ``scp``; returns (exit status, stdout, stderr)."""

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: AcceptorAssociation(scp).ul, HOST, 0)
        try:
            port = server.sockets[0].getsockname()[1]
            config = write_config(tmp_path, port, "OWNPRINT", **config_settings)
            process = await asyncio.create_subprocess_exec(
                *dicomagent_cmd("print", "-c", str(config), "film", *map(str, args)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            server.close()
        return process.returncode, out.decode(), err.decode()

    return asyncio.run(main())


def test_annotation_text_and_film_session_printing(tmp_path):
    """The annotation reaches the annotation box the configuration names, on every film;
    N-ACTION at film session level prints both films; a warning status (B605 on the film
    box N-CREATE) is reported; everything created is deleted at the end. 12-bit pixels in
    Explicit VR Big Endian (this SCP prefers the seed's Table 12 order)."""
    scp = OwnPrintSCP(statuses={("N-CREATE-RQ", BASIC_FILM_BOX): 0xB605})
    paths = [write_image(tmp_path / f"{n}.dcm", seed=10 + n) for n in range(3)]
    status, out, err = print_against_own_scp(
        scp, {"print_level": "film_session", "annotation_position": 2,
              "presentation_lut_shape": "LIN OD", "bits_stored": 12},
        tmp_path, *paths, "--layout", "2,1", "--annotation", "Ward 3 / Dr. Quincy")

    assert status == 0, out + err
    assert err.count("warning 0xB605 (requested min or max density outside the printer's "
                     "range)") == 2, err
    assert len(scp.printed) == 2
    for film in scp.printed:
        assert film.annotations == {2: "Ward 3 / Dr. Quincy"}
        assert film.film_box.ImageDisplayFormat == "STANDARD\\2,1"
        assert film.film_box.AnnotationDisplayFormatID == "ANNOTATION"
    assert sorted(scp.printed[0].images) == [1, 2] and sorted(scp.printed[1].images) == [1]
    # 2x1 on a 160 x 200 film: boxes of 80 x 200.
    for path, pixels in zip(paths, [*scp.printed[0].images.values(),
                                    *scp.printed[1].images.values()]):
        assert_pixels(pixels, expected_print(path, (80, 200), 12), path.name)
    assert scp.transfer_syntaxes == {EXPLICIT_VR_BIG_ENDIAN}
    assert [name for name, sop_class in scp.requests if sop_class == PRESENTATION_LUT] == \
        ["N-CREATE-RQ", "N-DELETE-RQ"]
    assert ("N-ACTION-RQ", BASIC_FILM_SESSION) in scp.requests
    assert ("N-ACTION-RQ", BASIC_FILM_BOX) not in scp.requests
    assert scp.objects == {}, "left behind on the printer"


def test_printer_warnings_are_reported(tmp_path):
    """Printer Status WARNING at the N-GET, and a WARNING N-EVENT-REPORT during the job:
    both reported, the event answered with 0000, the job printed."""
    scp = OwnPrintSCP(printer_status=("WARNING", "RECEIVER FULL"),
                      event_after=(1, 2, "SUPPLY LOW"))
    paths = [write_image(tmp_path / f"{n}.dcm", seed=20 + n) for n in range(2)]
    status, out, err = print_against_own_scp(scp, {}, tmp_path, *paths)

    assert status == 0, out + err
    assert "the printer's status is WARNING (RECEIVER FULL)" in err
    assert "printer event WARNING: SUPPLY LOW" in err
    assert scp.event_responses == [0x0000]
    assert len(scp.printed) == 2 and scp.objects == {}


def test_printer_in_failure_prints_nothing(tmp_path):
    """Printer Status FAILURE: the job stops after the N-GET, with the printer's reason;
    nothing is created."""
    scp = OwnPrintSCP(printer_status=("FAILURE", "PRINTER DOWN"))
    status, out, err = print_against_own_scp(scp, {}, tmp_path,
                                             write_image(tmp_path / "ct.dcm"))
    assert status == 1, out + err
    assert "the printer's status is FAILURE (PRINTER DOWN): nothing was printed" in err
    assert scp.requests == [("N-GET-RQ", PRINTER)]


def test_failure_event_stops_the_job_and_cleans_up(tmp_path):
    """A FAILURE N-EVENT-REPORT after the first image box: the job stops before the next
    step, deletes the film box and film session it created, exits 1."""
    scp = OwnPrintSCP(event_after=(1, 3, "FILM JAM"))
    paths = [write_image(tmp_path / f"{n}.dcm", seed=30 + n) for n in range(4)]
    status, out, err = print_against_own_scp(scp, {}, tmp_path, *paths, "--layout", "2,2")

    assert status == 1, out + err
    assert "printer event FAILURE: FILM JAM" in err
    assert scp.event_responses == [0x0000]
    assert scp.printed == []
    assert scp.requests[-2:] == [("N-DELETE-RQ", BASIC_FILM_BOX),
                                 ("N-DELETE-RQ", BASIC_FILM_SESSION)]
    assert scp.objects == {}, "left behind on the printer"


# --- rendering paths the print jobs above do not take ---------------------------------------------

def test_render_lookup_tables_and_sigmoid(tmp_path):
    """Modality LUT Sequence and VOI LUT Sequence (PS3.3 C.11.1, C.11.2.1.1), the SIGMOID
    window (C.11.2.1.3.1), and no VOI at all (the values' own range), at the image's own
    size (box = image)."""
    from dicomagent.render import render
    ds = pydicom.dcmread(write_image(tmp_path / "ct.dcm", rows=16, columns=32, seed=40))
    stored = ds.pixel_array.astype(int)

    modality = Dataset()
    modality.LUTDescriptor = [4096, 0, 16]
    modality.LUTData = [(4095 - v) * 2 for v in range(4096)]
    modality.ModalityLUTType = "US"
    voi = Dataset()
    voi.LUTDescriptor = [1024, 4096, 8]                 # maps 4096 ... 5119; outside: clamped
    voi.LUTData = [v // 4 for v in range(1024)]
    tables = copy.deepcopy(ds)
    del tables.RescaleSlope, tables.RescaleIntercept, tables.WindowCenter, tables.WindowWidth
    tables.ModalityLUTSequence, tables.VOILUTSequence = [modality], [voi]
    expected = [[min(max((4095 - v) * 2 - 4096, 0), 1023) // 4 for v in row] for row in stored]
    assert render(tables, (32, 16), 8).pixels.tolist() == expected

    sigmoid = copy.deepcopy(ds)
    sigmoid.VOILUTFunction = "SIGMOID"
    hu = stored - 1024
    expected = [[math.floor(255 / (1 + math.exp(-4 * (v - 40) / 400)) + 0.5) for v in row]
                for row in hu]
    assert numpy.abs(render(sigmoid, (32, 16), 8).pixels.astype(int) - expected).max() <= 1

    plain = copy.deepcopy(ds)
    del plain.WindowCenter, plain.WindowWidth
    low, high = hu.min(), hu.max()
    expected = [[math.floor((v - low) / (high - low) * 4095 + 0.5) for v in row] for row in hu]
    assert render(plain, (32, 16), 12).pixels.tolist() == expected
