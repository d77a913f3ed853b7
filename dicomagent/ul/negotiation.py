"""PS3.8 §7.1.1, §9.3.2–9.3.3 and PS3.7 Annex D.3.3: association negotiation.

As acceptor, ``negotiate(rq, policy)`` is the whole answer to an
A-ASSOCIATE-RQ: a pure function from the request and what we support to an
A-ASSOCIATE-AC or A-ASSOCIATE-RJ. As requestor, ``build_associate_rq``
writes the request and ``accepted_contexts`` reads the answer.

References
----------
PS3.8 §7.1.1.13 (presentation context definition list and result list),
§9.3.3.2 (results 0-4), Table 9-21 (reject reasons); PS3.7 Annex D.3.3.4
(SCP/SCU role selection), D.3.3.3 (asynchronous operations window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomagent.uids import (APPLICATION_CONTEXT_NAME, IMPLEMENTATION_CLASS_UID,
                             IMPLEMENTATION_VERSION_NAME, UNCOMPRESSED_TRANSFER_SYNTAXES)
from dicomagent.ul.codes import (PresentationContextResult, RejectReason, RejectResult,
                                 RejectSource)
from dicomagent.ul.items import (ApplicationContextItem, AsynchronousOperationsWindowSubItem,
                                 ImplementationClassUIDSubItem, ImplementationVersionNameSubItem,
                                 MaximumLengthSubItem, PresentationContextItemAC,
                                 PresentationContextItemRQ, SCPSCURoleSelectionSubItem,
                                 SOPClassExtendedNegotiationSubItem, UserInformationItem)
from dicomagent.ul.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from dicomagent.ul.primitives import AAssociateResponse


@dataclass(frozen=True, slots=True)
class AbstractSyntaxSupport:
    """What the acceptor supports for one abstract syntax.

    ``scp``: we take the default acceptor role (the requestor is SCU).
    ``scu``: we may act as SCU when the requestor proposes the SCP role
    through SCP/SCU Role Selection (e.g. C-GET's storage sub-operations).
    ``transfer_syntaxes``: the ones we accept; empty means any of the policy's.
    """

    scp: bool = True
    scu: bool = False
    transfer_syntaxes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AcceptorPolicy:
    """Everything ``negotiate`` needs to know about the local AE."""

    ae_title: str
    abstract_syntaxes: dict[str, AbstractSyntaxSupport]
    transfer_syntax_order: tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES
    check_called_aet: bool = False
    known_calling_aets: frozenset[str] | None = None
    maximum_length_received: int = 0
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME
    #: SOP class UID -> function(requested service-class-application-information)
    #: returning the bytes to answer with, or None to leave the sub-item out
    #: (PS3.7 D.3.3.5: SOP Class Extended Negotiation).
    extended_negotiation: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresentationContext:
    """One accepted presentation context, as both sides will use it."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    #: Whether the association-requestor / -acceptor may act as SCU and SCP.
    requestor_scu: bool = True
    requestor_scp: bool = False


def _reject(result: RejectResult, source: RejectSource, reason: RejectReason) -> AAssociateResponse:
    return AAssociateResponse(rj=A_ASSOCIATE_RJ(result, source, reason))


def negotiate(rq: A_ASSOCIATE_RQ, policy: AcceptorPolicy) -> AAssociateResponse:
    """Answer an A-ASSOCIATE-RQ as the association-acceptor (service-user level).

    Rejections, in this order (PS3.8 Table 9-21, source 1 service-user,
    rejected-permanent): application context name not supported (2),
    called AE title not recognised (7, when ``check_called_aet``), calling
    AE title not recognised (3, when ``known_calling_aets`` is set).
    Otherwise each presentation context is answered on its own (PS3.8
    §9.3.3.2): 3 abstract-syntax-not-supported, 4
    transfer-syntaxes-not-supported, 1 user-rejection when no role we can
    play was proposed, or 0 acceptance with the first transfer syntax of
    ``transfer_syntax_order`` that the requestor proposed.
    """
    if rq.application_context_name != APPLICATION_CONTEXT_NAME:
        return _reject(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                       RejectReason.APPLICATION_CONTEXT_NAME_NOT_SUPPORTED)
    if policy.check_called_aet and rq.called_ae_title != policy.ae_title:
        return _reject(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                       RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED)
    if (policy.known_calling_aets is not None
            and rq.calling_ae_title not in policy.known_calling_aets):
        return _reject(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                       RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED)

    user_information = rq.user_information
    proposed_roles = {item.sop_class_uid: item for item in user_information.role_selections}
    items: list = [ApplicationContextItem(APPLICATION_CONTEXT_NAME)]
    for pc in rq.presentation_contexts:
        items.append(_answer_context(pc, policy, proposed_roles.get(pc.abstract_syntax)))

    sub_items: list = [MaximumLengthSubItem(policy.maximum_length_received),
                       ImplementationClassUIDSubItem(policy.implementation_class_uid)]
    if user_information.asynchronous_operations_window is not None:
        # Seed 3.1.1.3: multiple outstanding operations are not supported.
        sub_items.append(AsynchronousOperationsWindowSubItem(1, 1))
    for uid, proposed in proposed_roles.items():
        support = policy.abstract_syntaxes.get(uid)
        if support is not None:
            sub_items.append(SCPSCURoleSelectionSubItem(
                uid, int(bool(proposed.scu_role) and support.scp),
                int(bool(proposed.scp_role) and support.scu)))
    sub_items.append(ImplementationVersionNameSubItem(policy.implementation_version_name))
    for item in user_information.sub_items:
        if type(item) is SOPClassExtendedNegotiationSubItem:
            answer = policy.extended_negotiation.get(item.sop_class_uid)
            reply = answer(item.service_class_application_information) if answer else None
            if reply is not None:
                sub_items.append(SOPClassExtendedNegotiationSubItem(item.sop_class_uid, reply))
    items.append(UserInformationItem(tuple(sub_items)))
    return AAssociateResponse(ac=A_ASSOCIATE_AC(rq.called_ae_title, rq.calling_ae_title,
                                                tuple(items)))


def _answer_context(pc: PresentationContextItemRQ, policy: AcceptorPolicy,
                    proposed_role: SCPSCURoleSelectionSubItem | None) -> PresentationContextItemAC:
    """PS3.8 §9.3.3.2: the result for one proposed presentation context."""
    first_proposed = pc.transfer_syntaxes[0] if pc.transfer_syntaxes else ""
    support = policy.abstract_syntaxes.get(pc.abstract_syntax)
    if support is None:
        return PresentationContextItemAC(
            pc.context_id, PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, first_proposed)
    if proposed_role is None:
        role_ok = support.scp
    else:
        role_ok = (proposed_role.scu_role and support.scp) or (proposed_role.scp_role and support.scu)
    if not role_ok:
        return PresentationContextItemAC(
            pc.context_id, PresentationContextResult.USER_REJECTION, first_proposed)
    acceptable = support.transfer_syntaxes or policy.transfer_syntax_order
    for ts in policy.transfer_syntax_order:
        if ts in pc.transfer_syntaxes and ts in acceptable:
            return PresentationContextItemAC(pc.context_id, PresentationContextResult.ACCEPTANCE, ts)
    for ts in pc.transfer_syntaxes:       # accepted syntaxes outside the order, if any
        if ts in support.transfer_syntaxes:
            return PresentationContextItemAC(pc.context_id, PresentationContextResult.ACCEPTANCE, ts)
    return PresentationContextItemAC(
        pc.context_id, PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, first_proposed)


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """A presentation context the requestor proposes, with optional role selection."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES
    #: PS3.7 D.3.3.4: propose these roles explicitly (None: default roles, no sub-item).
    scu_role: bool | None = None
    scp_role: bool | None = None


def build_associate_rq(calling_ae_title: str, called_ae_title: str,
                       contexts: list[ProposedContext], maximum_length_received: int = 0,
                       extra_sub_items: tuple = ()) -> A_ASSOCIATE_RQ:
    """The A-ASSOCIATE-RQ the requestor sends: context IDs 1, 3, 5, … (PS3.8 §9.3.2.2)."""
    if len(contexts) > 128:
        raise ValueError("at most 128 presentation contexts fit one association")
    items: list = [ApplicationContextItem(APPLICATION_CONTEXT_NAME)]
    roles: dict[str, SCPSCURoleSelectionSubItem] = {}
    for index, context in enumerate(contexts):
        items.append(PresentationContextItemRQ(2 * index + 1, context.abstract_syntax,
                                               tuple(context.transfer_syntaxes)))
        if context.scu_role is not None or context.scp_role is not None:
            roles[context.abstract_syntax] = SCPSCURoleSelectionSubItem(
                context.abstract_syntax, int(bool(context.scu_role)), int(bool(context.scp_role)))
    sub_items = [MaximumLengthSubItem(maximum_length_received),
                 ImplementationClassUIDSubItem(IMPLEMENTATION_CLASS_UID),
                 *roles.values(),
                 ImplementationVersionNameSubItem(IMPLEMENTATION_VERSION_NAME),
                 *extra_sub_items]
    items.append(UserInformationItem(tuple(sub_items)))
    return A_ASSOCIATE_RQ(called_ae_title, calling_ae_title, tuple(items))


def accepted_extended_negotiation(ac: A_ASSOCIATE_AC) -> dict[str, bytes]:
    """PS3.7 D.3.3.5: what the acceptor answered, by SOP class (absent: nothing agreed)."""
    return {item.sop_class_uid: item.service_class_application_information
            for item in ac.user_information.sub_items
            if type(item) is SOPClassExtendedNegotiationSubItem}


def accepted_contexts(rq: A_ASSOCIATE_RQ, ac: A_ASSOCIATE_AC) -> dict[int, PresentationContext]:
    """The presentation contexts both sides agreed on, by context ID, with their roles.

    PS3.7 D.3.3.4: with no role selection the requestor is SCU and the
    acceptor SCP; with it, the acceptor's answer is what holds.
    """
    proposed = {pc.context_id: pc for pc in rq.presentation_contexts}
    requested_roles = {item.sop_class_uid: item for item in rq.user_information.role_selections}
    answered_roles = {item.sop_class_uid: item for item in ac.user_information.role_selections}
    result = {}
    for pc in ac.presentation_contexts:
        if pc.result != PresentationContextResult.ACCEPTANCE or pc.context_id not in proposed:
            continue
        abstract_syntax = proposed[pc.context_id].abstract_syntax
        scu, scp = True, False
        if abstract_syntax in requested_roles:
            answer = answered_roles.get(abstract_syntax)
            if answer is not None:
                scu, scp = bool(answer.scu_role), bool(answer.scp_role)
        result[pc.context_id] = PresentationContext(pc.context_id, abstract_syntax,
                                                    pc.transfer_syntax, scu, scp)
    return result
