"""PS3.4: the service classes, one module each, and the registry built from them.

Each module declares a ``SERVICE``: the SOP classes it serves, the roles it
takes, a handler per request message, the statuses those handlers return,
the query keys of its information model, and the associations the agent
itself opens for those SOP classes (which ``dicomagent`` command, in which
role). Negotiation (which abstract syntaxes the acceptor supports, in which
roles), dispatch (which handler answers a request on a presentation
context), ``probe`` and the conformance statement (``dicomagent.conformance``)
all read the registry; nothing is listed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomagent.ul.negotiation import AbstractSyntaxSupport


@dataclass(frozen=True)
class Status:
    """A status a handler returns (PS3.7 Annex C), for the conformance statement.

    ``code`` is the module's constant (``Status(PENDING, ...)``), never a number
    typed again; ``meaning`` is what it says in this service.
    """

    code: int
    meaning: str


@dataclass(frozen=True)
class KeyGroup:
    """Query keys of one level or module of an information model (seed Tables 41-63).

    ``keys``: the ``archive.keys.Key`` or ``archive.worklist.Column`` tuple the
    SCP works from (each has ``tag``, ``keyword``, ``vr``). ``matching``: how
    the SCP uses them, in a few words ("matched in the index", "returned only").
    """

    name: str
    keys: tuple
    matching: str


@dataclass(frozen=True)
class Initiation:
    """An association the agent opens for a service's SOP classes (PS3.2 "Association
    Initiation Policy").

    ``role``: the agent's role on it ("SCU", or "SCP" with SCP/SCU Role Selection).
    ``command``: the ``dicomagent`` command that opens it, or "" when the daemon
    does (C-MOVE sub-operations, storage commitment reports, MPPS forwarding).
    ``activity``: the real-world activity, as the statement says it. ``sop_classes``:
    the ones proposed, when not all of the service's.
    """

    role: str
    command: str
    activity: str
    sop_classes: tuple[str, ...] = ()
    #: Extended negotiation the requestor may propose (e.g. ``find --date-time-matching``).
    extended_negotiation: str = ""


@dataclass(frozen=True)
class ServiceClass:
    """What one PS3.4 service class module declares.

    ``sop_classes``: UID -> name. ``scp`` / ``scu``: the roles the agent takes
    for them as acceptor (PS3.7 D.3.3.4); a service with neither is one the
    agent only requests. ``transfer_syntaxes``: the ones accepted (empty: the
    agent's ``transfer_syntax_order``). ``handlers``: request message class ->
    ``handler(association, context, received)``; a handler sends its
    response(s) with ``association.send_message`` and may be a coroutine.
    ``sinks``: request message class -> ``open_sink(association, context,
    command)``, where a data set must not be collected in memory.

    For the conformance statement: ``statuses``: request message class -> the
    ``Status``es its handler answers with; ``query_keys``: the information
    model's ``KeyGroup``s; ``initiates``: the associations the agent opens for
    these SOP classes; ``extended_negotiation_fields``: the names of the bytes
    of the service-class-application-information that ``extended_negotiation``
    answers, in order (the statement asks it which ones it accepts).
    """

    name: str
    reference: str
    sop_classes: dict[str, str]
    scp: bool = True
    scu: bool = False
    transfer_syntaxes: tuple[str, ...] = ()
    handlers: dict = field(default_factory=dict)
    sinks: dict = field(default_factory=dict)
    #: ``answer(requested bytes) -> bytes | None`` for SOP Class Extended Negotiation.
    extended_negotiation: object = None
    extended_negotiation_fields: tuple[str, ...] = ()
    statuses: dict = field(default_factory=dict)
    query_keys: tuple[KeyGroup, ...] = ()
    initiates: tuple[Initiation, ...] = ()


def registry(config=None) -> list[ServiceClass]:
    """Every service class of the agent, in conformance-statement order.

    The services the daemon accepts come first; then those the agent only
    requests (``scp`` and ``scu`` both False), which negotiation skips: a
    module that declares ``ServiceClass(scp=False, initiates=(Initiation(...),))``
    is added to ``requested_only`` (Print Management SCU is one).
    """
    from dicomagent.config import Config
    from dicomagent.services import (commitment, gp, mpps, mwl, printing, qr, storage,
                                     verification)
    config = config or Config()
    accepted = [verification.SERVICE, storage.service(config.storage), qr.FIND, qr.MOVE, qr.GET,
                commitment.SERVICE, mwl.SERVICE, mpps.SERVICE, gp.WORKLIST, gp.SCHEDULED_STEP,
                gp.PERFORMED_STEP, gp.META]
    requested_only = [printing.SERVICE]
    return accepted + requested_only


def acceptor_abstract_syntaxes(services: list[ServiceClass]) -> dict[str, AbstractSyntaxSupport]:
    """The acceptor's negotiation table, derived from the service declarations."""
    table = {}
    for service in services:
        if not (service.scp or service.scu):
            continue                    # requested only: not an abstract syntax we accept
        for uid in service.sop_classes:
            table[uid] = AbstractSyntaxSupport(scp=service.scp, scu=service.scu,
                                               transfer_syntaxes=service.transfer_syntaxes)
    return table


def extended_negotiation_table(services: list[ServiceClass]) -> dict:
    """SOP class UID -> the service's extended negotiation answer (PS3.7 D.3.3.5)."""
    return {uid: service.extended_negotiation for service in services
            if service.extended_negotiation is not None for uid in service.sop_classes}


def dispatch_table(services: list[ServiceClass], kind: str = "handlers") -> dict[tuple[type, str], object]:
    """(request message class, abstract syntax) -> handler (or sink opener, kind="sinks")."""
    table = {}
    for service in services:
        for uid in service.sop_classes:
            for message_class, function in getattr(service, kind).items():
                table[(message_class, uid)] = function
    return table
