"""UIDs that the protocol layers and services name.

References
----------
PS3.6 Annex A (registry of DICOM unique identifiers); PS3.5 §10 (transfer syntaxes);
PS3.7 Annex A.2.1 (DICOM Application Context Name).
"""

from dicomagent import __version__

#: PS3.7 Annex A.2.1: the one application context name DICOM defines.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

#: Implementation Class UID (PS3.7 Annex D.3.3.2), under a ``2.25.`` root of the project's own.
IMPLEMENTATION_CLASS_UID = "2.25.12438977016951859246539242654317201344"

#: Implementation Version Name: at most 16 characters (PS3.7 Annex D.3.3.2.3).
IMPLEMENTATION_VERSION_NAME = ("DICOMAGENT_" + ".".join(__version__.split(".")[:2]))[:16]

# PS3.5 §10: the three uncompressed transfer syntaxes (seed Table 12).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: Seed Table 12, in its order: the default transfer syntax preference as acceptor.
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

TRANSFER_SYNTAX_NAMES = {
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian",
}

#: PS3.4 Annex A: Verification SOP Class (seed Table 1).
VERIFICATION = "1.2.840.10008.1.1"
