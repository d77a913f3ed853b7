"""A small association acceptor inside an SCU command.

Some SCU operations need the peer to open an association back to us: the
storage commitment report on a new association (``dicomagent commit
--listen-port``), the C-STORE sub-operations of a C-MOVE to ourselves
(``dicomagent probe --listen-port``). ``Listener`` is what
``AcceptorAssociation`` needs of an agent, and no more: an AE title, the
abstract syntaxes it accepts in which roles, and a handler per request.

References
----------
PS3.8 §7.1 (association acceptance); PS3.7 D.3.3.4 (role selection).
"""

from __future__ import annotations

import asyncio

from dicomagent.association import AcceptorAssociation
from dicomagent.config import Config
from dicomagent.ul.negotiation import (AbstractSyntaxSupport, AcceptorPolicy, accepted_contexts,
                                       negotiate)


class Listener:
    """Accepts associations for ``abstract_syntaxes``; ``handlers`` as in the agent's
    dispatch table: (request message class, abstract syntax) -> handler."""

    def __init__(self, ae_title: str, abstract_syntaxes: dict[str, AbstractSyntaxSupport],
                 handlers: dict, dimse_timeout: float = 60.0):
        self.config = Config()
        self.config.agent.ae_title = ae_title
        self.config.agent.timeouts.dimse = dimse_timeout
        self.policy = AcceptorPolicy(ae_title=ae_title, abstract_syntaxes=abstract_syntaxes)
        self.handlers = handlers
        self.sinks: dict = {}
        self.send_cap = 1 << 20
        self.log_contexts = False
        self.server: asyncio.base_events.Server | None = None

    def negotiate(self, rq):
        response = negotiate(rq, self.policy)
        contexts = accepted_contexts(rq, response.ac) if response.ac is not None else {}
        return response, contexts

    def provider_check(self, rq):
        return None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: AcceptorAssociation(self).ul,
                                               host, port, reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
