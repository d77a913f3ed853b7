"""PS3.7 Annex C: status classes of the DIMSE Status (0000,0900).

References
----------
PS3.7 Annex C (Status Type Encoding), §C.1–C.5.
"""

from enum import Enum

SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = 0xFF00
PENDING_WARNING = 0xFF01          # C-FIND: optional keys not supported
# PS3.7 Annex C.5: general failures that any service may return.
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122    # PS3.7 C.5.5 (N-) / 0x0122 SOP class not supported
UNRECOGNIZED_OPERATION = 0x0211
PROCESSING_FAILURE = 0x0110
DUPLICATE_INVOCATION = 0x0210
MISTYPED_ARGUMENT = 0x0212
NO_SUCH_SOP_CLASS = 0x0118
INVALID_ATTRIBUTE_VALUE = 0x0106
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION_TYPE = 0x0123


class StatusCategory(Enum):
    """PS3.7 Annex C: what a status value means for the operation."""

    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"
    CANCEL = "Cancel"
    PENDING = "Pending"


def category(status: int) -> StatusCategory:
    """The category of a status value (PS3.7 Annex C; C.4 for the Bxxx warnings)."""
    if status == SUCCESS:
        return StatusCategory.SUCCESS
    if status in (PENDING, PENDING_WARNING):
        return StatusCategory.PENDING
    if status == CANCEL:
        return StatusCategory.CANCEL
    if status == 0x0001 or status & 0xF000 == 0xB000 or status == 0x0107 or status == 0x0116:
        return StatusCategory.WARNING
    return StatusCategory.FAILURE
