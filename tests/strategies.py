"""Hypothesis strategies for the PS3.8 items and PDUs and the PS3.7 command sets.

Every strategy draws only values the codecs can carry both ways:

- AE titles in PDUs: 1 to 16 printable ASCII characters, no leading or trailing
  space (PS3.8 Table 9-11: leading and trailing spaces are not significant);
- UIDs and names in items: latin-1 text that does not end with NUL or space
  (the decoder removes that padding, PS3.8 §9.3.2.2);
- item values stay well under 65536 bytes (Item-length is 2 bytes);
- unknown items and sub-items use item types the codec does not know, so they
  decode back to ``UnknownItem``.

For command sets (PS3.7 Annex E) each field is drawn from its VR in
``COMMAND_ELEMENTS``, or None (absent).

References
----------
PS3.8 §9.3 (PDUs and items), PS3.7 Annex D.3.3 (user information sub-items),
PS3.7 Annex E (command dictionary).
"""

from __future__ import annotations

from dataclasses import fields

from hypothesis import strategies as st

from dicomagent.dimse.commands import _REQUIRED, MESSAGES, TAGS
from dicomagent.ul.items import (ASSOCIATE_AC_ITEMS, ASSOCIATE_RQ_ITEMS,
                                 USER_INFORMATION_SUB_ITEMS, AbstractSyntaxSubItem,
                                 ApplicationContextItem, AsynchronousOperationsWindowSubItem,
                                 ImplementationClassUIDSubItem, ImplementationVersionNameSubItem,
                                 MaximumLengthSubItem, PresentationContextItemAC,
                                 PresentationContextItemRQ, SCPSCURoleSelectionSubItem,
                                 SOPClassCommonExtendedNegotiationSubItem,
                                 SOPClassExtendedNegotiationSubItem, TransferSyntaxSubItem,
                                 UnknownItem, UserIdentitySubItemAC, UserIdentitySubItemRQ,
                                 UserInformationItem)
from dicomagent.ul.pdu import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ,
                               A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF, PresentationDataValueItem)

# --- scalars --------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)

#: A UID: digits and dots (PS3.5 §9.1), odd and even lengths alike.
uids = st.text(alphabet="0123456789.", min_size=1, max_size=64)

#: Printable ASCII (ISO 646 G0 without control characters).
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))

#: A name in an item (Application-context-name, Implementation-version-name, a UID
#: as another implementation may send it): any latin-1 text that does not end with
#: NUL or space, possibly empty.
item_names = st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=64).map(
    lambda s: s.rstrip("\x00 "))

#: A name item's value, biased towards real UIDs.
item_uids = st.one_of(uids, item_names)

#: Called-/Calling-AE-title: 1-16 printable ASCII characters, no leading or trailing spaces.
ae_titles = (st.text(alphabet=_PRINTABLE, min_size=1, max_size=16)
             .map(lambda s: s.strip(" "))
             .filter(bool))

small_bytes = st.binary(max_size=48)


def unknown_items(known: dict) -> st.SearchStrategy[UnknownItem]:
    """An item whose type is not a key of ``known`` (it decodes back as UnknownItem)."""
    return st.builds(UnknownItem, u8.filter(lambda t: t not in known), small_bytes)


# --- items and sub-items (PS3.8 §9.3.2-9.3.3, PS3.7 Annex D.3.3) ---------------------------

application_context_items = st.builds(ApplicationContextItem, item_uids)
abstract_syntax_sub_items = st.builds(AbstractSyntaxSubItem, item_uids)
transfer_syntax_sub_items = st.builds(TransferSyntaxSubItem, item_uids)

presentation_context_items_rq = st.builds(
    PresentationContextItemRQ, u8, item_uids,
    st.lists(item_uids, max_size=5).map(tuple))

presentation_context_items_ac = st.builds(PresentationContextItemAC, u8, u8, item_uids)

maximum_length_sub_items = st.builds(MaximumLengthSubItem, u32)
implementation_class_uid_sub_items = st.builds(ImplementationClassUIDSubItem, item_uids)
implementation_version_name_sub_items = st.builds(
    ImplementationVersionNameSubItem, item_names.map(lambda s: s[:16].rstrip("\x00 ")))
asynchronous_operations_window_sub_items = st.builds(AsynchronousOperationsWindowSubItem,
                                                     u16, u16)
scp_scu_role_selection_sub_items = st.builds(SCPSCURoleSelectionSubItem, item_uids, u8, u8)
sop_class_extended_negotiation_sub_items = st.builds(SOPClassExtendedNegotiationSubItem,
                                                     item_uids, small_bytes)
sop_class_common_extended_negotiation_sub_items = st.builds(
    SOPClassCommonExtendedNegotiationSubItem, item_uids, item_uids,
    st.lists(item_uids, max_size=4).map(tuple))
user_identity_sub_items_rq = st.builds(UserIdentitySubItemRQ, u8, u8, small_bytes, small_bytes)
user_identity_sub_items_ac = st.builds(UserIdentitySubItemAC, small_bytes)
unknown_sub_items = unknown_items(USER_INFORMATION_SUB_ITEMS)

#: Every User Information sub-item class, and unknown ones.
user_information_sub_items = st.one_of(
    maximum_length_sub_items, implementation_class_uid_sub_items,
    implementation_version_name_sub_items, asynchronous_operations_window_sub_items,
    scp_scu_role_selection_sub_items, sop_class_extended_negotiation_sub_items,
    sop_class_common_extended_negotiation_sub_items, user_identity_sub_items_rq,
    user_identity_sub_items_ac, unknown_sub_items)

user_information_items = st.builds(
    UserInformationItem, st.lists(user_information_sub_items, max_size=8).map(tuple))

#: Every item class that ``X.decode(value)`` decodes (UnknownItem aside).
ITEM_STRATEGIES = {
    ApplicationContextItem: application_context_items,
    AbstractSyntaxSubItem: abstract_syntax_sub_items,
    TransferSyntaxSubItem: transfer_syntax_sub_items,
    PresentationContextItemRQ: presentation_context_items_rq,
    PresentationContextItemAC: presentation_context_items_ac,
    MaximumLengthSubItem: maximum_length_sub_items,
    ImplementationClassUIDSubItem: implementation_class_uid_sub_items,
    ImplementationVersionNameSubItem: implementation_version_name_sub_items,
    AsynchronousOperationsWindowSubItem: asynchronous_operations_window_sub_items,
    SCPSCURoleSelectionSubItem: scp_scu_role_selection_sub_items,
    SOPClassExtendedNegotiationSubItem: sop_class_extended_negotiation_sub_items,
    SOPClassCommonExtendedNegotiationSubItem: sop_class_common_extended_negotiation_sub_items,
    UserIdentitySubItemRQ: user_identity_sub_items_rq,
    UserIdentitySubItemAC: user_identity_sub_items_ac,
    UserInformationItem: user_information_items,
}

#: Any item or sub-item, UnknownItem included.
items = st.one_of(*ITEM_STRATEGIES.values(), unknown_items({}))

# --- PDUs (PS3.8 §9.3) -------------------------------------------------------------------------

rq_variable_items = st.one_of(application_context_items, presentation_context_items_rq,
                              user_information_items, unknown_items(ASSOCIATE_RQ_ITEMS))
ac_variable_items = st.one_of(application_context_items, presentation_context_items_ac,
                              user_information_items, unknown_items(ASSOCIATE_AC_ITEMS))

a_associate_rqs = st.builds(A_ASSOCIATE_RQ, ae_titles, ae_titles,
                            st.lists(rq_variable_items, max_size=6).map(tuple), u16)
a_associate_acs = st.builds(A_ASSOCIATE_AC, ae_titles, ae_titles,
                            st.lists(ac_variable_items, max_size=6).map(tuple), u16)
a_associate_rjs = st.builds(A_ASSOCIATE_RJ, u8, u8, u8)
a_release_rqs = st.just(A_RELEASE_RQ())
a_release_rps = st.just(A_RELEASE_RP())
a_aborts = st.builds(A_ABORT, u8, u8)

presentation_data_value_items = st.builds(PresentationDataValueItem, u8, u8,
                                          st.binary(max_size=300))
p_data_tfs = st.builds(P_DATA_TF, st.lists(presentation_data_value_items, min_size=1,
                                           max_size=5).map(tuple))

PDU_STRATEGIES = {
    A_ASSOCIATE_RQ: a_associate_rqs,
    A_ASSOCIATE_AC: a_associate_acs,
    A_ASSOCIATE_RJ: a_associate_rjs,
    P_DATA_TF: p_data_tfs,
    A_RELEASE_RQ: a_release_rqs,
    A_RELEASE_RP: a_release_rps,
    A_ABORT: a_aborts,
}

#: Any of the seven PDUs.
pdus = st.one_of(*PDU_STRATEGIES.values())

# --- DIMSE command sets (PS3.7 Annex E) -------------------------------------------------------

#: AE VR: 1-16 characters, no leading/trailing spaces, no backslash.
command_ae_titles = (st.text(alphabet=_PRINTABLE.replace("\\", ""), min_size=1, max_size=16)
                     .map(lambda s: s.strip(" "))
                     .filter(bool))

#: LO VR: up to 64 characters, no leading/trailing spaces, no backslash.
long_strings = (st.text(alphabet=_PRINTABLE.replace("\\", ""), max_size=64)
                .map(lambda s: s.strip(" ")))

#: AT VR: a list of attribute tags, each (group << 16) | element.
attribute_tags = st.lists(u32, max_size=6).map(tuple)

VR_STRATEGIES = {
    "US": u16,
    "UL": u32,
    "UI": uids,
    "AE": command_ae_titles,
    "LO": long_strings,
    "AT": attribute_tags,
}


def field_values(keyword: str, present: bool = False) -> st.SearchStrategy:
    """A value for the command field ``keyword`` (PS3.7 keyword), or None when absent."""
    value = VR_STRATEGIES[TAGS[keyword][1]]
    return value if present else st.none() | value


def messages_of(cls, present: bool = False) -> st.SearchStrategy:
    """A DIMSE message of class ``cls``; ``present`` draws every field (no None).

    The fields a message cannot do without (``commands._REQUIRED``: Command Data
    Set Type, Message ID or the one responded to, a response's Status) are
    always drawn: their absence is a decode error, tested on its own.
    """
    required = _REQUIRED[cls]
    return st.builds(cls, **{f.name: field_values(f.name, present or f.name in required)
                             for f in fields(cls)})


#: Any DIMSE message, every field possibly absent.
messages = st.sampled_from(sorted(MESSAGES)).flatmap(lambda cf: messages_of(MESSAGES[cf]))

#: Any DIMSE message with every one of its fields present.
complete_messages = st.sampled_from(sorted(MESSAGES)).flatmap(
    lambda cf: messages_of(MESSAGES[cf], present=True))


# --- byte-level helpers ------------------------------------------------------------------------

@st.composite
def split_points(draw, length: int, max_splits: int = 8) -> list[int]:
    """Sorted cut points in ``range(1, length)`` for cutting a buffer of ``length`` bytes."""
    if length < 2:
        return []
    return sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=max_splits))))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (sorted, inside the buffer)."""
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def mutated(draw, original: bytes, max_mutations: int = 4) -> bytes:
    """``original`` with a few byte flips, truncations, extensions or rewritten lengths."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert",
                                     "pdu_length", "u16", "u32"]))
        if kind in ("flip", "set", "u16", "u32") and not data:
            kind = "extend"
        if kind == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "set":
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0x00, 0x20, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "pdu_length" and len(data) >= 6:
            # PS3.8 §9.3.1: bytes 3-6 are the PDU-length.
            data[2:6] = draw(st.sampled_from([0, 1, 4, 5, 6, 0x7FFF_FFFF, 0xFFFF_FFFF])
                             | u32).to_bytes(4, "big")
        elif kind == "u16" and len(data) >= 2:
            # An Item-length or another 2-byte length field, wherever it may be.
            i = draw(st.integers(0, len(data) - 2))
            data[i:i + 2] = draw(u16).to_bytes(2, "big")
        elif kind == "u32" and len(data) >= 4:
            i = draw(st.integers(0, len(data) - 4))
            data[i:i + 4] = draw(u32).to_bytes(4, "big")
    return bytes(data)
