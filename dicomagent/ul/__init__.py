"""PS3.8: the DICOM Upper Layer.

``pdu`` and ``items`` are the byte codecs (§9.3), ``states`` and ``fsm`` the
association state machine (§9.2), ``connection`` the sans-IO core that joins
them, ``negotiation`` the acceptor's answer to an A-ASSOCIATE-RQ, and
``transport`` the one asyncio driver around the core.
"""
