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
    for them as acceptor (PS3.7 D.3.3.4). ``handlers``: request message class
    -> ``handler(association, context, received)``; a handler sends its
    response(s) with ``association.send_message`` and may be a coroutine.
    """

    name: str
    reference: str
    sop_classes: dict[str, str]
    scp: bool = True
    scu: bool = False
    handlers: dict = field(default_factory=dict)


def registry() -> list[ServiceClass]:
    """Every service class the agent serves, in conformance-statement order."""
    from dicomagent.services import verification
    return [verification.SERVICE]


def acceptor_abstract_syntaxes(services: list[ServiceClass],
                               transfer_syntaxes: tuple[str, ...] = ()) -> dict[str, AbstractSyntaxSupport]:
    """The acceptor's negotiation table, derived from the service declarations."""
    table = {}
    for service in services:
        for uid in service.sop_classes:
            table[uid] = AbstractSyntaxSupport(scp=service.scp, scu=service.scu,
                                               transfer_syntaxes=transfer_syntaxes)
    return table


def dispatch_table(services: list[ServiceClass]) -> dict[tuple[type, str], object]:
    """(request message class, abstract syntax) -> handler."""
    table = {}
    for service in services:
        for uid in service.sop_classes:
            for message_class, handler in service.handlers.items():
                table[(message_class, uid)] = handler
    return table
