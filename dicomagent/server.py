"""The daemon: listen, accept associations, serve them, stop cleanly.

``Agent`` holds what every association of the daemon shares: the
configuration, the negotiation policy and the dispatch table built from the
service registry, and the set of live associations (for the
``max_associations`` limit and for a clean shutdown).

References
----------
PS3.8 §7.1 (association establishment), Table 9-21 (local-limit-exceeded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import time

from dicomagent import services
from dicomagent.archive import SPARES, Archive, StorageSettings
from dicomagent.archive.workflow import WorkflowStore
from dicomagent.association import AcceptorAssociation
from dicomagent.config import Config
from dicomagent.ul.codes import RejectReason, RejectResult, RejectSource
from dicomagent.ul.negotiation import AcceptorPolicy, accepted_contexts, negotiate
from dicomagent.ul.pdu import A_ASSOCIATE_RJ
from dicomagent.ul.states import State

log = logging.getLogger("dicomagent")

#: States in which an association counts against ``max_associations``.
_HOLDING_A_SLOT = {State.Sta3, State.Sta6, State.Sta7, State.Sta8, State.Sta9, State.Sta10,
                   State.Sta11, State.Sta12}


class Agent:
    """The association-acceptor of ``dicomagent serve``."""

    def __init__(self, config: Config):
        self.config = config
        agent = config.agent
        self.services = services.registry(config)
        self.handlers = services.dispatch_table(self.services)
        self.sinks = services.dispatch_table(self.services, "sinks")
        storage = config.storage
        self.archive = Archive(agent.data_dir, StorageSettings(
            fsync=storage.fsync, min_free_mb=storage.min_free_mb,
            on_duplicate=storage.on_duplicate, accept_mismatch=storage.accept_mismatch),
            index_in_process=True, spares=SPARES)
        known = None
        if agent.require_known_calling_aet:
            known = frozenset(peer.ae_title for peer in config.peers.values())
        self.policy = AcceptorPolicy(
            ae_title=agent.ae_title,
            abstract_syntaxes=services.acceptor_abstract_syntaxes(self.services),
            transfer_syntax_order=tuple(agent.transfer_syntax_order),
            check_called_aet=agent.check_called_aet,
            known_calling_aets=known,
            maximum_length_received=agent.max_pdu_length,
            extended_negotiation=services.extended_negotiation_table(self.services))
        self._negotiated: dict = {}
        #: Worklist, procedure steps and outbox: one connection, used on one thread.
        self.workflow = WorkflowStore(os.path.join(self.archive.data_dir, "index.sqlite"))
        self._workflow_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="workflow")
        from dicomagent.forward import Forwarder
        from dicomagent.services.commitment import Reporter
        self.reporter = Reporter(self)
        self.forwarder = Forwarder(self)
        self.send_cap = agent.max_pdu_send_length
        self.log_contexts = agent.log_contexts
        self.associations: set[AcceptorAssociation] = set()
        self.server: asyncio.base_events.Server | None = None
        self._retention: asyncio.Task | None = None
        self._expiry: asyncio.Task | None = None

    async def in_workflow(self, function, *args):
        """``function(workflow_store, *args)`` on the workflow thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._workflow_thread, function, self.workflow, *args)

    def negotiate(self, rq):
        """``negotiate`` with the agent's policy, and the contexts it accepts.

        A pure function of the request, so results for recent requests are
        kept: modalities repeat the same A-ASSOCIATE-RQ on every connection.
        """
        result = self._negotiated.get(rq)
        if result is None:
            response = negotiate(rq, self.policy)
            contexts = accepted_contexts(rq, response.ac) if response.ac is not None else {}
            result = (response, contexts)
            if len(self._negotiated) >= 256:
                self._negotiated.clear()
            self._negotiated[rq] = result
        return result

    def provider_check(self, rq) -> A_ASSOCIATE_RJ | None:
        """AE-6: refuse at the service-provider level when no association slot is left."""
        limit = self.config.agent.max_associations
        if limit and sum(1 for a in self.associations
                         if a.connection.state in _HOLDING_A_SLOT) >= limit:
            log.warning("association from %s refused: %d associations already open "
                        "(max_associations)", rq.calling_ae_title, limit)
            return A_ASSOCIATE_RJ(RejectResult.REJECTED_TRANSIENT,
                                  RejectSource.SERVICE_PROVIDER_PRESENTATION,
                                  RejectReason.LOCAL_LIMIT_EXCEEDED)
        return None

    def _new_connection(self):
        association = AcceptorAssociation(self)
        self.associations.add(association)
        association.ul.closed.add_done_callback(lambda _: self.associations.discard(association))
        return association.ul

    async def start(self) -> None:
        """Listen on the configured address (returns once listening)."""
        agent = self.config.agent
        os.makedirs(agent.data_dir, exist_ok=True)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._new_connection, agent.host, agent.port,
                                               reuse_address=True, backlog=512)
        log.info("listening on %s:%d as %s (data dir %s)", agent.host, self.port,
                 agent.ae_title, agent.data_dir)
        # What exists now (modules, pydicom's dictionaries, the configuration) lives as
        # long as the daemon: out of the collector's sight, a full collection does not
        # walk it again every few thousand objects stored.
        gc.freeze()
        self.reporter.start()
        self.forwarder.start()
        if self.config.mpps.lifetime_days or self.config.gp.lifetime_days:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_steps())
        if self.config.retention.max_age_days:
            from dicomagent.retention import retention_loop
            self._retention = asyncio.get_running_loop().create_task(
                retention_loop(self.archive, self.config.retention))

    async def _expire_steps(self) -> None:
        """Seed 3.1.3.6.3, 3.1.3.7.3, 3.1.3.8.3: procedure step instances live
        ``[mpps] lifetime_days`` and ``[gp] lifetime_days``; checked hourly."""
        from dicomagent.services import gp, mpps
        rules = [(what, module.expire, days) for what, module, days in (
            ("MPPS", mpps, self.config.mpps.lifetime_days),
            ("GP-SPS/GP-PPS", gp, self.config.gp.lifetime_days)) if days]
        while True:
            for what, expire, days in rules:
                removed = await self.in_workflow(expire, days, time.time())
                if removed:
                    log.info("removed %d %s instance(s) older than %g days", removed, what, days)
            await asyncio.sleep(3600)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0 in tests)."""
        return self.server.sockets[0].getsockname()[1] if self.server else self.config.agent.port

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let operations in progress finish (up to ``grace`` s).

        An association with no operation in progress is aborted at once (the
        acceptor cannot release, PS3.8 §7.2); one in the middle of an
        operation is aborted as soon as that operation is done, or when the
        grace period ends.
        """
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.associations:
            log.info("waiting for %d association(s) to finish", len(self.associations))
        while self.associations and loop.time() < deadline:
            for association in list(self.associations):
                if association.idle_timed_out():
                    association.abort()
            await asyncio.wait([a.ul.closed for a in self.associations], timeout=0.2)
        for association in list(self.associations):
            association.abort()
        if self.server is not None:
            await self.server.wait_closed()
        await self.reporter.stop()
        await self.forwarder.stop()
        for task in (self._retention, self._expiry):
            if task is not None:
                task.cancel()
        self._workflow_thread.shutdown(wait=True)
        self.workflow.close()
        self.archive.close()

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        await self.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("stopping: no new associations")
        await self.stop()
        log.info("stopped")
