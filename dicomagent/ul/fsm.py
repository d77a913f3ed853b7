"""PS3.8 §9.2: the Upper Layer state machine, as the standard prints it.

The actions are Tables 9-6 to 9-9, one function each, named as the standard
names them (``AE_6`` is AE-6); ``TABLE_9_10`` is the state transition table,
one row per event in the standard's order, one cell per state. A blank cell
of the standard is absent here: for a primitive from the local user it is a
``LocalProtocolError``; PDUs cannot arrive in the states whose column is
blank (Sta1, Sta4: no transport connection yet).

An action only records what it does through its context (``ctx.send``,
``ctx.deliver``, ``ctx.start_artim``, ``ctx.stop_artim``,
``ctx.close_transport``, ``ctx.open_transport``) and returns the next state;
the driver in ``ul/transport.py`` carries the outputs out. ``ctx`` is the
``ULConnection`` of ``ul/connection.py``.

What the standard leaves open is in ``LOCAL_EXTENSIONS``, never in the table.

References
----------
PS3.8 §9.2.2 (Tables 9-6 to 9-9, the actions), §9.2.3 (Table 9-10).
"""

from __future__ import annotations

from dicomagent.ul.codes import AbortReason, AbortSource
from dicomagent.ul.pdu import A_ABORT, A_RELEASE_RP, A_RELEASE_RQ
from dicomagent.ul.primitives import (AAbortIndication, AAssociateConfirmation,
                                      AAssociateIndication, APAbortIndication,
                                      AReleaseConfirmation, AReleaseIndication)
from dicomagent.ul.states import Event, State

S = State


def action(name: str, next_states: set[State]):
    """Mark a function as the action ``name`` of PS3.8 §9.2.2."""

    def mark(function):
        function.name = name
        function.next_states = frozenset(next_states)
        return function

    return mark


# --- Table 9-6: Association establishment -------------------------------------------------

@action("AE-1", {S.Sta4})
def AE_1(ctx, request):
    """Issue TRANSPORT CONNECT request primitive to local transport service."""
    ctx.pending_request = request.rq
    ctx.open_transport()
    return S.Sta4


@action("AE-2", {S.Sta5})
def AE_2(ctx, _):
    """Send A-ASSOCIATE-RQ-PDU."""
    ctx.send(ctx.pending_request)
    return S.Sta5


@action("AE-3", {S.Sta6})
def AE_3(ctx, ac):
    """Issue A-ASSOCIATE confirmation (accept) primitive."""
    ctx.association_accepted(ac)
    ctx.deliver(AAssociateConfirmation(ac=ac))
    return S.Sta6


@action("AE-4", {S.Sta1})
def AE_4(ctx, rj):
    """Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection."""
    ctx.deliver(AAssociateConfirmation(rj=rj))
    ctx.close_transport()
    return S.Sta1


@action("AE-5", {S.Sta2})
def AE_5(ctx, _):
    """Issue Transport connection response primitive; start ARTIM timer."""
    ctx.start_artim()
    return S.Sta2


@action("AE-6", {S.Sta3, S.Sta13})
def AE_6(ctx, rq):
    """Stop ARTIM; indicate an acceptable A-ASSOCIATE-RQ, else send A-ASSOCIATE-RJ.

    If the A-ASSOCIATE-RQ is acceptable by the service-provider, issue an
    A-ASSOCIATE indication primitive (next state Sta3); otherwise issue an
    A-ASSOCIATE-RJ PDU and start the ARTIM timer (next state Sta13).
    """
    ctx.stop_artim()
    rj = ctx.provider_check(rq)
    if rj is None:
        ctx.association_requested(rq)
        ctx.deliver(AAssociateIndication(rq))
        return S.Sta3
    ctx.send(rj)
    ctx.start_artim()
    return S.Sta13


@action("AE-7", {S.Sta6})
def AE_7(ctx, response):
    """Send A-ASSOCIATE-AC PDU."""
    ctx.send(response.ac)
    return S.Sta6


@action("AE-8", {S.Sta13})
def AE_8(ctx, response):
    """Send A-ASSOCIATE-RJ PDU and start ARTIM timer."""
    ctx.send(response.rj)
    ctx.start_artim()
    return S.Sta13


# --- Table 9-7: Data transfer --------------------------------------------------------------

@action("DT-1", {S.Sta6})
def DT_1(ctx, buffers):
    """Send P-DATA-TF PDU."""
    ctx.send_buffers(buffers)
    return S.Sta6


@action("DT-2", {S.Sta6})
def DT_2(ctx, _):
    """Send P-DATA indication primitive (the PDVs follow as they arrive)."""
    ctx.deliver_p_data = True
    return S.Sta6


# --- Table 9-8: Association release --------------------------------------------------------

@action("AR-1", {S.Sta7})
def AR_1(ctx, _):
    """Send A-RELEASE-RQ PDU."""
    ctx.send(A_RELEASE_RQ())
    return S.Sta7


@action("AR-2", {S.Sta8})
def AR_2(ctx, _):
    """Issue A-RELEASE indication primitive."""
    ctx.deliver(AReleaseIndication())
    return S.Sta8


@action("AR-3", {S.Sta1})
def AR_3(ctx, _):
    """Issue A-RELEASE confirmation primitive, and close transport connection."""
    ctx.deliver(AReleaseConfirmation())
    ctx.close_transport()
    return S.Sta1


@action("AR-4", {S.Sta13})
def AR_4(ctx, _):
    """Issue A-RELEASE-RP PDU and start ARTIM timer."""
    ctx.send(A_RELEASE_RP())
    ctx.start_artim()
    return S.Sta13


@action("AR-5", {S.Sta1})
def AR_5(ctx, _):
    """Stop ARTIM timer."""
    ctx.stop_artim()
    return S.Sta1


@action("AR-6", {S.Sta7})
def AR_6(ctx, _):
    """Issue P-DATA indication."""
    ctx.deliver_p_data = True
    return S.Sta7


@action("AR-7", {S.Sta8})
def AR_7(ctx, buffers):
    """Issue P-DATA-TF PDU."""
    ctx.send_buffers(buffers)
    return S.Sta8


@action("AR-8", {S.Sta9, S.Sta10})
def AR_8(ctx, _):
    """Issue A-RELEASE indication (release collision).

    If association-requestor, next state is Sta9; if not, Sta10.
    """
    ctx.deliver(AReleaseIndication(collision=True))
    return S.Sta9 if ctx.is_requestor else S.Sta10


@action("AR-9", {S.Sta11})
def AR_9(ctx, _):
    """Send A-RELEASE-RP PDU."""
    ctx.send(A_RELEASE_RP())
    return S.Sta11


@action("AR-10", {S.Sta12})
def AR_10(ctx, _):
    """Issue A-RELEASE confirmation primitive."""
    ctx.deliver(AReleaseConfirmation())
    return S.Sta12


# --- Table 9-9: Association abort ----------------------------------------------------------

@action("AA-1", {S.Sta13})
def AA_1(ctx, _):
    """Send A-ABORT PDU (service-user source) and start (or restart) ARTIM timer."""
    ctx.send(A_ABORT(AbortSource.SERVICE_USER, AbortReason.REASON_NOT_SPECIFIED))
    ctx.start_artim()
    return S.Sta13


@action("AA-2", {S.Sta1})
def AA_2(ctx, _):
    """Stop ARTIM timer if running. Close transport connection."""
    ctx.stop_artim()
    ctx.close_transport()
    return S.Sta1


@action("AA-3", {S.Sta1})
def AA_3(ctx, abort):
    """Issue A-ABORT (service-user source) or A-P-ABORT (service-provider source)
    indication, and close transport connection."""
    if abort.source == AbortSource.SERVICE_USER:
        ctx.deliver(AAbortIndication(abort.source, abort.reason))
    else:
        ctx.deliver(APAbortIndication(abort.reason, "A-ABORT received from the peer"))
    ctx.close_transport()
    return S.Sta1


@action("AA-4", {S.Sta1})
def AA_4(ctx, _):
    """Issue A-P-ABORT indication primitive."""
    ctx.deliver(APAbortIndication(AbortReason.REASON_NOT_SPECIFIED,
                                  "transport connection closed by the peer"))
    return S.Sta1


@action("AA-5", {S.Sta1})
def AA_5(ctx, _):
    """Stop ARTIM timer."""
    ctx.stop_artim()
    return S.Sta1


@action("AA-6", {S.Sta13})
def AA_6(ctx, _):
    """Ignore PDU."""
    return S.Sta13


@action("AA-7", {S.Sta13})
def AA_7(ctx, _):
    """Send A-ABORT PDU."""
    ctx.send(A_ABORT(AbortSource.SERVICE_PROVIDER, ctx.abort_reason))
    return S.Sta13


@action("AA-8", {S.Sta13})
def AA_8(ctx, _):
    """Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication,
    and start ARTIM timer."""
    ctx.send(A_ABORT(AbortSource.SERVICE_PROVIDER, ctx.abort_reason))
    ctx.deliver(APAbortIndication(ctx.abort_reason, ctx.abort_detail))
    ctx.start_artim()
    return S.Sta13


# --- Table 9-10: State transition table -----------------------------------------------------

E = Event

TABLE_9_10 = {
    E.Evt1: {S.Sta1: AE_1},
    E.Evt2: {S.Sta4: AE_2},
    E.Evt3: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AE_3, S.Sta6: AA_8, S.Sta7: AA_8,
             S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
             S.Sta13: AA_6},
    E.Evt4: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AE_4, S.Sta6: AA_8, S.Sta7: AA_8,
             S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
             S.Sta13: AA_6},
    E.Evt5: {S.Sta1: AE_5},
    E.Evt6: {S.Sta2: AE_6, S.Sta3: AA_8, S.Sta5: AA_8, S.Sta6: AA_8, S.Sta7: AA_8,
             S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
             S.Sta13: AA_7},
    E.Evt7: {S.Sta3: AE_7},
    E.Evt8: {S.Sta3: AE_8},
    E.Evt9: {S.Sta6: DT_1, S.Sta8: AR_7},
    E.Evt10: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AA_8, S.Sta6: DT_2, S.Sta7: AR_6,
              S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
              S.Sta13: AA_6},
    E.Evt11: {S.Sta6: AR_1},
    E.Evt12: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AA_8, S.Sta6: AR_2, S.Sta7: AR_8,
              S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
              S.Sta13: AA_6},
    E.Evt13: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AA_8, S.Sta6: AA_8, S.Sta7: AR_3,
              S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AR_10, S.Sta11: AR_3, S.Sta12: AA_8,
              S.Sta13: AA_6},
    E.Evt14: {S.Sta8: AR_4, S.Sta9: AR_9, S.Sta12: AR_4},
    E.Evt15: {S.Sta3: AA_1, S.Sta4: AA_2, S.Sta5: AA_1, S.Sta6: AA_1, S.Sta7: AA_1,
              S.Sta8: AA_1, S.Sta9: AA_1, S.Sta10: AA_1, S.Sta11: AA_1, S.Sta12: AA_1},
    E.Evt16: {S.Sta2: AA_2, S.Sta3: AA_3, S.Sta5: AA_3, S.Sta6: AA_3, S.Sta7: AA_3,
              S.Sta8: AA_3, S.Sta9: AA_3, S.Sta10: AA_3, S.Sta11: AA_3, S.Sta12: AA_3,
              S.Sta13: AA_2},
    E.Evt17: {S.Sta2: AA_5, S.Sta3: AA_4, S.Sta4: AA_4, S.Sta5: AA_4, S.Sta6: AA_4,
              S.Sta7: AA_4, S.Sta8: AA_4, S.Sta9: AA_4, S.Sta10: AA_4, S.Sta11: AA_4,
              S.Sta12: AA_4, S.Sta13: AR_5},
    E.Evt18: {S.Sta2: AA_2, S.Sta13: AA_2},
    E.Evt19: {S.Sta2: AA_1, S.Sta3: AA_8, S.Sta5: AA_8, S.Sta6: AA_8, S.Sta7: AA_8,
              S.Sta8: AA_8, S.Sta9: AA_8, S.Sta10: AA_8, S.Sta11: AA_8, S.Sta12: AA_8,
              S.Sta13: AA_7},
}

# --- Beyond the standard ----------------------------------------------------------------------

LOCAL_EXTENSIONS = {
    # Local extension: PS3.8 §9.2, Evt15 in Sta2 is blank, because no association
    # exists yet; a daemon that shuts down, or gives up on a peer that opened a
    # connection and stalls mid-PDU, closes the connection (AA-2).
    (E.Evt15, S.Sta2): AA_2,
    # Local extension: PS3.8 §9.2, Evt15 in Sta13 is blank, because the association
    # is already gone; a local user that will not wait for the peer to close
    # closes the connection itself (AA-2), as DCMTK's AA-2T does.
    (E.Evt15, S.Sta13): AA_2,
}


def lookup(event: Event, state: State):
    """The action for ``event`` in ``state``: Table 9-10, then the local extensions."""
    found = TABLE_9_10[event].get(state)
    if found is None:
        found = LOCAL_EXTENSIONS.get((event, state))
    return found
