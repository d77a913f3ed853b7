"""PS3.8 §9.3.1, §9.3.5: cutting the received byte stream into PDUs.

The reader takes the bytes as the transport delivers them, in chunks of any
size, and calls its owner back:

- ``on_pdu(pdu)`` with each A-ASSOCIATE / A-RELEASE / A-ABORT PDU, decoded whole;
- ``on_p_data_tf()`` when the header of a P-DATA-TF PDU has arrived (the
  state machine's Evt10 happens then, not when the whole PDU is in);
- ``on_pdv(context_id, message_control_header, fragment, pdv_complete)``
  with each piece of a PDV's value as it arrives: ``fragment`` is a
  ``memoryview`` of the received chunk, valid for that call only.

So a P-DATA-TF PDU of any length (the agent advertises Maximum Length 0,
"unlimited") never needs to be held in memory, and a PDV's value goes from
the socket's chunk to its destination without a copy. Only a PDU header, a
PDV item header, or a control PDU (at most ``MAX_CONTROL_PDU_LENGTH``) is
buffered.

After a decode error the reader stops: a byte stream whose framing is lost
cannot be trusted again (the state machine aborts the association).

References
----------
PS3.8 §9.3.1 (PDU structure), §9.3.5 (P-DATA-TF), Annex E (PDV and Message
Control Header).
"""

from __future__ import annotations

from dicomagent.ul.codes import AbortReason, PDUDecodeError, PDUType
from dicomagent.ul.pdu import A_ASSOCIATE_RQ, CONTROL_PDUS, MAX_CONTROL_PDU_LENGTH, PDU_HEADER, PDV_HEADER

# What the reader waits for next.
_PDU_HEADER = 0        # the 6-byte PDU header
_CONTROL_BODY = 1      # the rest of a control PDU
_PDV_HEADER = 2        # a 6-byte PDV item header (Item-length, context ID, control header)
_PDV_VALUE = 3         # the rest of a PDV's value
_FAILED = 4            # framing lost: discard everything


def _decode_associate_rq(data: bytes):
    """Decode an A-ASSOCIATE-RQ, remembering recent ones.

    A modality sends the same A-ASSOCIATE-RQ, byte for byte, every time it
    connects; the decoded PDU is immutable, so it is decoded once.
    """
    pdu = _RECENT_RQ.get(data)
    if pdu is None:
        pdu = A_ASSOCIATE_RQ.decode(memoryview(data))
        if len(_RECENT_RQ) >= 256:
            _RECENT_RQ.clear()
        _RECENT_RQ[data] = pdu
    return pdu


_RECENT_RQ: dict[bytes, object] = {}


class PDUReader:
    """Incremental PDU decoder for one transport connection."""

    __slots__ = ("_owner", "_phase", "_buffer", "_needed", "_pdu_left", "_pdv_left",
                 "_context_id", "_mch", "_pdu_type")

    def __init__(self, owner):
        self._owner = owner
        self._phase = _PDU_HEADER
        self._buffer = bytearray()   # a header or control PDU being collected
        self._needed = 6             # bytes wanted in _buffer before it can be parsed
        self._pdu_left = 0           # bytes of the current P-DATA-TF not yet read
        self._pdv_left = 0           # bytes of the current PDV value not yet read
        self._context_id = 0
        self._mch = 0
        self._pdu_type = 0

    def stop(self) -> None:
        """Read nothing more: the connection has ended (Sta1)."""
        self._phase = _FAILED
        self._buffer = bytearray()

    @property
    def failed(self) -> bool:
        return self._phase == _FAILED

    @property
    def idle(self) -> bool:
        """True between PDUs: nothing of a started PDU is pending."""
        return self._phase == _PDU_HEADER and not self._buffer

    def feed(self, data) -> None:
        """Consume one chunk from the transport; raises ``PDUDecodeError``."""
        if self._phase == _FAILED:
            return
        view = memoryview(data)
        offset = 0
        end = len(view)
        try:
            while offset < end:
                phase = self._phase
                if phase == _PDV_VALUE:
                    take = min(self._pdv_left, end - offset)
                    self._pdv_left -= take
                    self._pdu_left -= take
                    complete = self._pdv_left == 0
                    if complete:
                        self._phase = _PDV_HEADER if self._pdu_left else _PDU_HEADER
                        self._needed = 6
                    self._owner.on_pdv(self._context_id, self._mch,
                                       view[offset:offset + take], complete)
                    offset += take
                    if self._phase == _FAILED:
                        return
                    continue
                # Collect a header or a control PDU in the small buffer.
                buffer = self._buffer
                want = self._needed - len(buffer)
                if not buffer and end - offset >= self._needed:
                    block = view[offset:offset + self._needed]   # whole, no copy needed
                    offset += self._needed
                else:
                    buffer += view[offset:offset + want]
                    offset += min(want, end - offset)
                    if len(buffer) < self._needed:
                        return
                    block = buffer
                    # Views of ``block`` may outlive this step: start a fresh buffer.
                    self._buffer = bytearray()
                if phase == _PDU_HEADER:
                    self._on_pdu_header(block)
                elif phase == _PDV_HEADER:
                    self._on_pdv_header(block)
                else:
                    self._on_control_body(block)
                if self._phase == _FAILED:       # the owner stopped us
                    return
        except PDUDecodeError:
            self._phase = _FAILED
            self._buffer = bytearray()
            raise

    def _on_pdu_header(self, block) -> None:
        pdu_type, _, length = PDU_HEADER.unpack_from(block, 0)
        if pdu_type == PDUType.P_DATA_TF:
            if length < 6:
                raise PDUDecodeError("PDU-length", detail=f"P-DATA-TF of length {length} "
                                                          f"holds no PDV item")
            self._pdu_left = length
            self._phase = _PDV_HEADER
            self._needed = 6
            self._owner.on_p_data_tf()
            return
        if pdu_type not in CONTROL_PDUS:
            raise PDUDecodeError("PDU-type", AbortReason.UNRECOGNIZED_PDU, f"0x{pdu_type:02X}")
        if length > MAX_CONTROL_PDU_LENGTH:
            raise PDUDecodeError("PDU-length", detail=f"{length} bytes for "
                                                      f"{PDUType(pdu_type).name}")
        self._pdu_type = pdu_type
        self._buffer = bytearray(block)       # the header stays in front of the body
        self._needed = 6 + length
        self._phase = _CONTROL_BODY
        if length == 0:
            block, self._buffer = self._buffer, bytearray()
            self._on_control_body(block)

    def _on_control_body(self, block) -> None:
        if self._pdu_type == PDUType.A_ASSOCIATE_RQ:
            pdu = _decode_associate_rq(bytes(block))
        else:
            pdu = CONTROL_PDUS[self._pdu_type].decode(memoryview(block))
        self._phase = _PDU_HEADER
        self._needed = 6
        self._owner.on_pdu(pdu)

    def _on_pdv_header(self, block) -> None:
        item_length, context_id, mch = PDV_HEADER.unpack_from(block, 0)
        if item_length < 2 or item_length + 4 > self._pdu_left:
            raise PDUDecodeError("Item-length", detail=f"PDV item length {item_length} with "
                                                       f"{self._pdu_left} bytes left in the PDU")
        self._pdu_left -= 6
        self._pdv_left = item_length - 2
        self._context_id = context_id
        self._mch = mch
        if self._pdv_left:
            self._phase = _PDV_VALUE
        else:
            # An empty PDV value is delivered at once, complete.
            self._phase = _PDV_HEADER if self._pdu_left else _PDU_HEADER
            self._owner.on_pdv(context_id, mch, memoryview(b""), True)
