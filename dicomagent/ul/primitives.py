"""PS3.8 §7: the Upper Layer service primitives.

What the local user hands the core is a *request* or *response* primitive;
what the core hands back is an *indication* or *confirmation*. The
A-ASSOCIATE primitives carry the PDU they map onto (PS3.8 §9.3.2–9.3.4 say
which parameter goes into which field), so no parameter is written twice.

References
----------
PS3.8 §7.1 (A-ASSOCIATE), §7.2 (A-RELEASE), §7.3 (A-ABORT), §7.4 (A-P-ABORT),
§7.6 (P-DATA).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomagent.ul.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ


@dataclass(frozen=True, slots=True)
class AAssociateRequest:
    """PS3.8 §7.1: A-ASSOCIATE request, issued by the association-requestor."""

    rq: A_ASSOCIATE_RQ


@dataclass(frozen=True, slots=True)
class AAssociateIndication:
    """PS3.8 §7.1: A-ASSOCIATE indication, delivered to the association-acceptor."""

    rq: A_ASSOCIATE_RQ


@dataclass(frozen=True, slots=True)
class AAssociateResponse:
    """PS3.8 §7.1: A-ASSOCIATE response: accept (``ac``, Evt7) or reject (``rj``, Evt8)."""

    ac: A_ASSOCIATE_AC | None = None
    rj: A_ASSOCIATE_RJ | None = None


@dataclass(frozen=True, slots=True)
class AAssociateConfirmation:
    """PS3.8 §7.1: A-ASSOCIATE confirmation: accepted (``ac``) or rejected (``rj``)."""

    ac: A_ASSOCIATE_AC | None = None
    rj: A_ASSOCIATE_RJ | None = None


@dataclass(frozen=True, slots=True)
class PDataIndication:
    """PS3.8 §7.6: P-DATA indication, one piece of one PDV at a time.

    Interpretation: PS3.8 §7.6 delivers a list of whole PDVs. With no limit on
    the PDU size a PDV may be larger than memory, so the core delivers each
    piece of a PDV's value as it arrives; ``pdv_complete`` is true on the
    piece that ends the PDV. ``fragment`` is a view of the received bytes,
    valid only until the callback that received it returns.
    """

    context_id: int
    message_control_header: int
    fragment: memoryview
    pdv_complete: bool


@dataclass(frozen=True, slots=True)
class AReleaseIndication:
    """PS3.8 §7.2: A-RELEASE indication; ``collision`` when both sides asked (AR-8)."""

    collision: bool = False


@dataclass(frozen=True, slots=True)
class AReleaseConfirmation:
    """PS3.8 §7.2: A-RELEASE confirmation (AR-3, AR-10)."""


@dataclass(frozen=True, slots=True)
class AAbortIndication:
    """PS3.8 §7.3: A-ABORT indication: the peer's service-user aborted (AA-3)."""

    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class APAbortIndication:
    """PS3.8 §7.4: A-P-ABORT indication: the service-provider aborted (AA-3, AA-4, AA-8).

    ``reason`` is the A-ABORT Reason/Diag. (PS3.8 Table 9-26); ``detail`` is our
    own one-line account of what happened, for the log.
    """

    reason: int
    detail: str = ""
