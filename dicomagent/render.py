"""PS3.3 C.11 and PS3.4 N.2: the grayscale pipeline that turns an image into print pixels.

Stored values go through the Modality LUT (rescale or table), the VOI LUT (window or
table), the polarity (MONOCHROME1, or a presentation state's Presentation LUT), the
spatial transformations and displayed area of a Grayscale Softcopy Presentation State
when one is given, and are then resampled to fit an image box with the image's
physical aspect ratio kept. The result is what the Preformatted Grayscale Image
Sequence of a Basic Grayscale Image Box carries (PS3.3 C.13.5.1): MONOCHROME2, 8 or 12
bits stored, P-values (PS3.14) when the printer applies a Presentation LUT.

Every step works on float64 arrays scaled to [0, 1] after the VOI; only the last step
quantizes (round half up).

References
----------
PS3.3 C.11.1 (Modality LUT), C.11.2 (VOI LUT, C.11.2.1.2 window functions), C.11.6
(Presentation LUT), C.10.4 (Displayed Area), C.10.6 (Spatial Transformation), C.7.6.3.1.2
(Photometric Interpretation); PS3.4 N.2 (Grayscale Transformations of a GSPS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
import pydicom
from pydicom.pixels import apply_modality_lut


class RenderError(Exception):
    """An image that cannot be rendered for print (no pixels, colour, ...)."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """Print pixels: MONOCHROME2, ``bits`` stored (8 in uint8, 12 in uint16)."""

    pixels: numpy.ndarray
    bits: int

    @property
    def rows(self) -> int:
        return self.pixels.shape[0]

    @property
    def columns(self) -> int:
        return self.pixels.shape[1]


# --- PS3.3 C.11.1: Modality LUT -------------------------------------------------------------

def stored_values(ds: pydicom.Dataset) -> numpy.ndarray:
    """The stored pixel values of the first frame (PS3.3 C.7.6.3), as pydicom decodes them."""
    if "PixelData" not in ds:
        raise RenderError("no Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise RenderError(f"{ds.get('PhotometricInterpretation', 'colour')} image: only "
                          f"grayscale images can be printed on a grayscale printer")
    try:
        array = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - pydicom's many decoder errors
        raise RenderError(f"cannot decode Pixel Data: {error}") from None
    if array.ndim == 3:
        array = array[0]
    return array


def modality_lut(array: numpy.ndarray, ds: pydicom.Dataset,
                 gsps: pydicom.Dataset | None) -> numpy.ndarray:
    """PS3.3 C.11.1: Rescale Slope/Intercept or the Modality LUT Sequence.

    Interpretation: PS3.4 N.2.1.1: with a presentation state, its Modality LUT module
    replaces the image's; a presentation state without one asks for the identity.
    """
    source = ds if gsps is None else gsps
    if "ModalityLUTSequence" in source or "RescaleSlope" in source:
        return numpy.asarray(apply_modality_lut(array, source), dtype=numpy.float64)
    return array.astype(numpy.float64)


# --- PS3.3 C.11.2: VOI LUT ---------------------------------------------------------------------

def window(x: numpy.ndarray, center: float, width: float,
           function: str = "LINEAR") -> numpy.ndarray:
    """PS3.3 C.11.2.1.2: the window functions, output in [0, 1].

    LINEAR (C.11.2.1.2.1), LINEAR_EXACT (C.11.2.1.3.2) and SIGMOID (C.11.2.1.3.1).
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + numpy.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise RenderError(f"Window Width {width:g} must be greater than 0 (LINEAR_EXACT)")
        return numpy.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise RenderError(f"Window Width {width:g} must be at least 1 (LINEAR)")
    if width == 1:
        return (x > center - 0.5).astype(numpy.float64)
    return numpy.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def lut_table(item: pydicom.Dataset) -> tuple[numpy.ndarray, int, int]:
    """A LUT item (PS3.3 C.11.2.1.1): (data, first value mapped, bits per entry).

    Interpretation: PS3.3 C.11.1.1.1: 0 entries means 65536; LUT Data as OW is 16-bit
    words in little endian (the byte order of nearly every file).
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        table = numpy.frombuffer(data, dtype="<u2", count=len(data) // 2)
    else:
        table = numpy.atleast_1d(numpy.asarray(data))
    return table[:entries or 65536].astype(numpy.float64), first, bits


def apply_table(x: numpy.ndarray, table: numpy.ndarray, first: int, bits: int) -> numpy.ndarray:
    """Look ``x`` up in a LUT: values below/above the mapped range take the first/last entry.

    Output in [0, 1]: the entry divided by 2^bits - 1 (PS3.3 C.11.2.1.1).
    """
    index = numpy.clip(numpy.rint(x).astype(numpy.int64) - first, 0, len(table) - 1)
    return table[index] / float((1 << bits) - 1)


def _first(value) -> float:
    """The first value of a multi-valued attribute (PS3.3 C.11.2.1.2: the first is the default)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def _references(item: pydicom.Dataset, sop_instance_uid: str) -> bool:
    """Whether a presentation state item applies to the image (no Referenced Image
    Sequence: to every image of the presentation state)."""
    references = item.get("ReferencedImageSequence")
    if not references:
        return True
    return any(ref.get("ReferencedSOPInstanceUID") == sop_instance_uid for ref in references)


def voi_source(ds: pydicom.Dataset, gsps: pydicom.Dataset | None) -> pydicom.Dataset | None:
    """The data set whose window or VOI LUT applies: the image's own, or the item of the
    presentation state's Softcopy VOI LUT Sequence that references it (PS3.3 C.11.8)."""
    if gsps is None:
        return ds
    uid = str(ds.get("SOPInstanceUID", ""))
    for item in gsps.get("SoftcopyVOILUTSequence", []) or []:
        if _references(item, uid):
            return item
    return None


def voi_lut(x: numpy.ndarray, source: pydicom.Dataset | None) -> numpy.ndarray:
    """PS3.3 C.11.2: the first window, else the first VOI LUT, else the full range of ``x``.

    Local extension: with neither, the values' own minimum and maximum make the window
    (PS3.3 leaves the choice to the application).
    """
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        return window(x, _first(source.WindowCenter), _first(source.WindowWidth),
                      str(source.get("VOILUTFunction", "LINEAR")))
    if source is not None and source.get("VOILUTSequence"):
        table, first, bits = lut_table(source.VOILUTSequence[0])
        return apply_table(x, table, first, bits)
    low, high = float(x.min()), float(x.max())
    if high == low:
        return numpy.zeros_like(x)
    return (x - low) / (high - low)


# --- PS3.3 C.11.6 and C.7.6.3.1.2: polarity --------------------------------------------------

def presentation_lut(y: numpy.ndarray, ds: pydicom.Dataset,
                     gsps: pydicom.Dataset | None) -> numpy.ndarray:
    """Make 0 black and 1 white.

    Without a presentation state, MONOCHROME1 is inverted (PS3.3 C.7.6.3.1.2: its minimum
    is white). With one, its Presentation LUT decides (PS3.3 C.11.6: IDENTITY, INVERSE, or
    a table), whatever the image's Photometric Interpretation (PS3.4 N.2.1.4).
    """
    if gsps is None:
        return 1.0 - y if ds.get("PhotometricInterpretation") == "MONOCHROME1" else y
    if gsps.get("PresentationLUTSequence"):
        table, _, bits = lut_table(gsps.PresentationLUTSequence[0])
        return apply_table(y * (len(table) - 1), table, 0, bits)
    return 1.0 - y if gsps.get("PresentationLUTShape") == "INVERSE" else y


# --- PS3.3 C.10.4 and C.10.6: displayed area and spatial transformation -------------------------

def _pixel_ratio(ds: pydicom.Dataset, area: pydicom.Dataset | None) -> float:
    """Vertical over horizontal size of a pixel (1.0 when nothing says otherwise).

    From the displayed area's Presentation Pixel Spacing or Aspect Ratio (PS3.3 C.10.4),
    else the image's Pixel Aspect Ratio or Pixel Spacing (row spacing \\ column spacing).
    """
    for source in (area, ds):
        if source is None:
            continue
        for keyword in ("PresentationPixelSpacing", "PixelSpacing"):
            spacing = source.get(keyword)
            if spacing and len(spacing) == 2 and float(spacing[1]) > 0:
                return float(spacing[0]) / float(spacing[1])
        for keyword in ("PresentationPixelAspectRatio", "PixelAspectRatio"):
            ratio = source.get(keyword)
            if ratio and len(ratio) == 2 and float(ratio[1]) > 0:
                return float(ratio[0]) / float(ratio[1])
    return 1.0


def displayed_area(ds: pydicom.Dataset, gsps: pydicom.Dataset | None) -> pydicom.Dataset | None:
    """The Displayed Area Selection Sequence item for the image (PS3.3 C.10.4), if any."""
    if gsps is None:
        return None
    uid = str(ds.get("SOPInstanceUID", ""))
    for item in gsps.get("DisplayedAreaSelectionSequence", []) or []:
        if _references(item, uid):
            return item
    return None


def crop_to_area(y: numpy.ndarray, area: pydicom.Dataset | None) -> numpy.ndarray:
    """PS3.3 C.10.4: keep the displayed area (column\\row corners, 1-based, in the image
    before spatial transformation).

    Local extension: an area reaching outside the image is cut at the image's edges.
    """
    if area is None or "DisplayedAreaTopLeftHandCorner" not in area:
        return y
    (c0, r0), (c1, r1) = (area.DisplayedAreaTopLeftHandCorner,
                          area.DisplayedAreaBottomRightHandCorner)
    rows = sorted((int(r0), int(r1)))
    cols = sorted((int(c0), int(c1)))
    r_start, r_stop = max(rows[0], 1) - 1, min(rows[1], y.shape[0])
    c_start, c_stop = max(cols[0], 1) - 1, min(cols[1], y.shape[1])
    if r_start >= r_stop or c_start >= c_stop:
        raise RenderError("the displayed area lies outside the image")
    return y[r_start:r_stop, c_start:c_stop]


def spatial_transformation(y: numpy.ndarray, gsps: pydicom.Dataset | None) -> tuple[numpy.ndarray, bool]:
    """PS3.3 C.10.6: Image Horizontal Flip, then Image Rotation (clockwise, degrees).

    Returns the array and whether rows and columns were swapped (rotation by 90 or 270).
    """
    if gsps is None:
        return y, False
    if gsps.get("ImageHorizontalFlip") == "Y":
        y = y[:, ::-1]
    rotation = int(gsps.get("ImageRotation", 0) or 0) % 360
    if rotation % 90:
        raise RenderError(f"Image Rotation {rotation} is not a multiple of 90")
    return numpy.rot90(y, -(rotation // 90)), rotation in (90, 270)


# --- fitting the image box -------------------------------------------------------------------------

def fit(rows: int, columns: int, pixel_ratio: float, box: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the image scaled to fit ``box`` (columns, rows) with its physical
    aspect ratio kept; square output pixels."""
    box_columns, box_rows = box
    height = rows * pixel_ratio                      # in units of one pixel's width
    scale = min(box_columns / columns, box_rows / height)
    return max(1, min(box_rows, round(height * scale))), \
        max(1, min(box_columns, round(columns * scale)))


def resample(y: numpy.ndarray, rows: int, columns: int) -> numpy.ndarray:
    """Bilinear interpolation to ``rows`` × ``columns``, pixel centres aligned.

    Output pixel i samples the input at (i + 0.5) · n_in / n_out − 0.5, clamped to the
    first and last input pixel; the four neighbours are weighted by distance.
    """
    def axis(n_out: int, n_in: int):
        position = numpy.clip((numpy.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = numpy.floor(position).astype(numpy.int64)
        high = numpy.minimum(low + 1, n_in - 1)
        return low, high, position - low

    r0, r1, fr = axis(rows, y.shape[0])
    c0, c1, fc = axis(columns, y.shape[1])
    top = y[r0][:, c0] * (1 - fc) + y[r0][:, c1] * fc
    bottom = y[r1][:, c0] * (1 - fc) + y[r1][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def quantize(y: numpy.ndarray, bits: int) -> numpy.ndarray:
    """[0, 1] to 0 … 2^bits − 1, rounded half up."""
    top = (1 << bits) - 1
    values = numpy.floor(numpy.clip(y, 0.0, 1.0) * top + 0.5)
    return values.astype(numpy.uint8 if bits <= 8 else numpy.uint16)


# --- the whole pipeline ----------------------------------------------------------------------------

def render(ds: pydicom.Dataset, box: tuple[int, int], bits: int,
           gsps: pydicom.Dataset | None = None) -> Rendered:
    """The print pixels of ``ds`` for an image box of ``box`` = (columns, rows) pixels.

    References
    ----------
    PS3.4 N.2 (the order: Modality LUT, VOI LUT, Presentation LUT; then the spatial
    transformation and displayed area), PS3.3 C.13.5.1 (Preformatted Grayscale Image).
    """
    photometric = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RenderError(f"Photometric Interpretation {photometric}: only MONOCHROME1 and "
                          f"MONOCHROME2 images can be printed on a grayscale printer")
    x = modality_lut(stored_values(ds), ds, gsps)
    y = presentation_lut(voi_lut(x, voi_source(ds, gsps)), ds, gsps)
    area = displayed_area(ds, gsps)
    y = crop_to_area(y, area)
    ratio = _pixel_ratio(ds, area)
    y, swapped = spatial_transformation(y, gsps)
    if swapped:
        ratio = 1.0 / ratio
    rows, columns = fit(y.shape[0], y.shape[1], ratio, box)
    return Rendered(quantize(resample(y, rows, columns), bits), bits)
