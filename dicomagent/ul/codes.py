"""PS3.8 §9.3: the coded values carried by A-ASSOCIATE-RJ, A-ABORT and
Presentation Context (AC) items, and the error a decoder raises.

References
----------
PS3.8 §9.3.4 Table 9-21 (A-ASSOCIATE-RJ), §9.3.8 Table 9-26 (A-ABORT),
§9.3.3.2 Table 9-18 (Presentation Context Item, AC), §9.3.1 (PDU types).
"""

from enum import IntEnum


class PDUType(IntEnum):
    """PS3.8 §9.3.1: the seven PDU types."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortSource(IntEnum):
    """PS3.8 Table 9-26, field Source."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """PS3.8 Table 9-26, field Reason/Diag. (significant when the source is 2)."""

    REASON_NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    RESERVED = 3
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class RejectResult(IntEnum):
    """PS3.8 Table 9-21, field Result."""

    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RejectSource(IntEnum):
    """PS3.8 Table 9-21, field Source."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """PS3.8 Table 9-21, field Reason/Diag.; the meaning depends on the source.

    Source 1 (service-user): 1 no-reason-given, 2 application-context-name-not-supported,
    3 calling-AE-title-not-recognized, 7 called-AE-title-not-recognized.
    Source 2 (service-provider, ACSE): 1 no-reason-given, 2 protocol-version-not-supported.
    Source 3 (service-provider, presentation): 1 temporary-congestion, 2 local-limit-exceeded.
    """

    # Source 1
    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = 2
    CALLING_AE_TITLE_NOT_RECOGNIZED = 3
    CALLED_AE_TITLE_NOT_RECOGNIZED = 7
    # Source 2 (1 is NO_REASON_GIVEN again)
    PROTOCOL_VERSION_NOT_SUPPORTED = 2
    # Source 3
    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


REJECT_REASON_TEXT = {
    (RejectSource.SERVICE_USER, 1): "no-reason-given",
    (RejectSource.SERVICE_USER, 2): "application-context-name-not-supported",
    (RejectSource.SERVICE_USER, 3): "calling-AE-title-not-recognized",
    (RejectSource.SERVICE_USER, 7): "called-AE-title-not-recognized",
    (RejectSource.SERVICE_PROVIDER_ACSE, 1): "no-reason-given",
    (RejectSource.SERVICE_PROVIDER_ACSE, 2): "protocol-version-not-supported",
    (RejectSource.SERVICE_PROVIDER_PRESENTATION, 1): "temporary-congestion",
    (RejectSource.SERVICE_PROVIDER_PRESENTATION, 2): "local-limit-exceeded",
}


def reject_reason_text(source: int, reason: int) -> str:
    """The standard's wording of an A-ASSOCIATE-RJ Source + Reason/Diag. pair."""
    return REJECT_REASON_TEXT.get((source, reason), f"reason {reason}")


class PresentationContextResult(IntEnum):
    """PS3.8 Table 9-18, field Result/Reason."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class PDUDecodeError(Exception):
    """Bytes off the wire that are not a valid PDU.

    ``field`` names the PS3.8 field that was wrong and ``reason`` the A-ABORT
    Reason/Diag. it implies (PS3.8 Table 9-26). It never leaves
    ``ULConnection.receive_data``: there it becomes Evt19.
    """

    def __init__(self, field: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE,
                 detail: str = ""):
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(f"{field}: {detail or reason.name.lower().replace('_', '-')}")


class LocalProtocolError(Exception):
    """The local user asked for something the state table forbids in this state."""
