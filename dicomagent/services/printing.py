"""PS3.4 Annex H: Basic Grayscale Print Management, SCU only (``dicomagent.printscu``).

The agent never accepts a print SOP class; it proposes them in ``dicomagent
print``. This declaration is what the registry, ``probe`` and the
conformance statement read; the SOP class UIDs are ``printscu``'s.

References
----------
PS3.4 H.3 (Meta SOP classes, Table H.3-1), H.4.4, H.4.9; seed 3.1.2.9, Table 11.
"""

from __future__ import annotations

from dicomagent import printscu
from dicomagent.services import Initiation, ServiceClass

SERVICE = ServiceClass(
    name="Basic Grayscale Print Management",
    reference="PS3.4 Annex H",
    sop_classes={
        printscu.BASIC_GRAYSCALE_PRINT_MANAGEMENT_META: "Basic Grayscale Print Management Meta",
        printscu.PRESENTATION_LUT: "Presentation LUT",
        printscu.BASIC_ANNOTATION_BOX: "Basic Annotation Box",
    },
    scp=False,
    initiates=(Initiation("SCU", "print", "print images on a DICOM printer: film session, "
                          "film boxes (Image Display Format STANDARD\\C,R), image boxes, print "
                          "(N-GET, N-CREATE, N-SET, N-ACTION, N-DELETE); Presentation LUT and "
                          "Basic Annotation Box on their own contexts when used"),),
)
