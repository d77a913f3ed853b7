"""PS3.4: the service classes, one module each, and the registry built from them.

Each module declares a ``SERVICE``: the SOP classes it serves, the roles it
takes, and a handler per request message. Negotiation (which abstract
syntaxes the acceptor supports, in which roles), dispatch (which handler
answers a request on a presentation context), ``probe`` and the conformance
statement all read the registry; nothing is listed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomagent.ul.negotiation import AbstractSyntaxSupport


@dataclass(frozen=True)
class ServiceClass:
    """What one PS3.4 service class module declares.

    ``sop_classes``: UID -> name. ``scp`` / ``scu``: the roles the agent takes
    for them as acceptor (PS3.7 D.3.3.4). ``transfer_syntaxes``: the ones
    accepted (empty: the agent's ``transfer_syntax_order``). ``handlers``:
    request message class -> ``handler(association, context, received)``; a
    handler sends its response(s) with ``association.send_message`` and may be
    a coroutine. ``sinks``: request message class -> ``open_sink(association,
    context, command)``, where a data set must not be collected in memory.
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


def registry(config=None) -> list[ServiceClass]:
    """Every service class the agent serves, in conformance-statement order."""
    from dicomagent.config import Config
    from dicomagent.services import commitment, gp, mpps, mwl, qr, storage, verification
    config = config or Config()
    return [verification.SERVICE, storage.service(config.storage), qr.FIND, qr.MOVE, qr.GET,
            commitment.SERVICE, mwl.SERVICE, mpps.SERVICE, gp.WORKLIST, gp.SCHEDULED_STEP,
            gp.PERFORMED_STEP, gp.META]


def acceptor_abstract_syntaxes(services: list[ServiceClass]) -> dict[str, AbstractSyntaxSupport]:
    """The acceptor's negotiation table, derived from the service declarations."""
    table = {}
    for service in services:
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
