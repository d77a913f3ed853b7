"""The agent's configuration: embedded defaults, one TOML file, command-line overrides.

Every key is declared once, in the dataclasses below, with its type and
default; ``load_config`` checks a TOML file against them and names the key of
any mistake (``agent.timeouts.artim: expected a number, got 'x'``).

Example::

    [agent]
    ae_title = "DICOMAGENT"
    port = 11112

    [peers.pacs]
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES


class ConfigError(Exception):
    """A configuration mistake; the message names the key."""


@dataclass
class Timeouts:
    #: PS3.8 §9.1.5 ARTIM timer: waiting for A-ASSOCIATE-RQ, and for the peer to close.
    artim: float = 30.0
    #: Waiting for the next DIMSE message (acceptor: idle association; requestor: a response).
    dimse: float = 600.0
    #: TCP connect, and a PDU that stalls half way.
    network: float = 30.0


@dataclass
class AgentSettings:
    #: Our AE title (1 to 16 characters).
    ae_title: str = "DICOMAGENT"
    #: Address to listen on.
    host: str = "0.0.0.0"
    #: TCP port to listen on.
    port: int = 11112
    #: Where stored objects, the index and the workflow store live.
    data_dir: str = "./dicomagent-data"
    #: Simultaneous associations; 0 = no limit (seed 3.1.1.2).
    max_associations: int = 0
    #: Maximum Length Received we advertise; 0 = unlimited (seed 3.1.1.1).
    max_pdu_length: int = 0
    #: Largest P-DATA-TF PDU we send to a peer that advertises 0 (no limit).
    max_pdu_send_length: int = 1 << 20
    #: Acceptor's transfer syntax preference (seed Table 12 order by default).
    transfer_syntax_order: list[str] = field(
        default_factory=lambda: list(UNCOMPRESSED_TRANSFER_SYNTAXES))
    #: Reject an A-ASSOCIATE-RQ whose Called-AE-title is not ours.
    check_called_aet: bool = False
    #: Reject a Calling-AE-title that is not the ae_title of a [peers.NAME] entry.
    require_known_calling_aet: bool = False
    #: Log the accepted presentation contexts of every association.
    log_contexts: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class StorageConfig:
    #: Each stored file and its name on stable storage before C-STORE-RSP success.
    fsync: bool = True
    #: Refuse data sets (A700) when the data dir's file system has less free space (MiB).
    min_free_mb: int = 100
    #: A SOP Instance UID already stored: "keep" the first copy or "replace" it.
    on_duplicate: str = "keep"
    #: Store a data set whose SOP Class/Instance UID differ from the command, with B007.
    accept_mismatch: bool = False
    #: Accept every Storage SOP Class, not only the seed's Table 2.
    accept_all_storage_classes: bool = False
    #: Accept compressed transfer syntaxes too (stored as received).
    accept_compressed: bool = False


@dataclass
class RetentionConfig:
    #: Delete instances received more than this many days ago; 0 = keep everything.
    max_age_days: float = 0.0
    #: Only instances sent by these calling AE titles (empty: from anyone).
    calling_ae_titles: list[str] = field(default_factory=list)
    #: Only instances whose storage has been committed (storage commitment).
    only_committed: bool = False
    #: How often the daemon applies the rule, in hours.
    interval_hours: float = 1.0


@dataclass
class MppsConfig:
    #: Peers (names of ``[peers.NAME]`` tables) that get every accepted N-CREATE / N-SET.
    forward_to: list[str] = field(default_factory=list)
    #: Delete MPPS instances not updated for this many days; 0 = keep them.
    lifetime_days: float = 0.0


@dataclass
class GeneralPurposeConfig:
    #: Delete GP-SPS (once COMPLETED or DISCONTINUED) and GP-PPS instances not updated for
    #: this many days; 0 = keep them.
    lifetime_days: float = 0.0


@dataclass
class OutboxConfig:
    #: Back-off for a forwarding peer that cannot be reached: first wait, doubling up to last (s).
    first_retry: float = 10.0
    #: The longest wait between two tries (s).
    last_retry: float = 3600.0


@dataclass
class Peer:
    #: The peer's AE title.
    ae_title: str
    #: Its host name or address.
    host: str
    #: Its TCP port.
    port: int


@dataclass
class PrintSettings:
    """A printer's film attributes: ``[print.NAME]`` for the ``[peers.NAME]`` of that name.

    The values go into the Basic Film Session and Basic Film Box N-CREATE (PS3.3 C.13.1,
    C.13.3); an empty string (or 0 for the densities) leaves the attribute out, so the
    printer uses its own default. Seed 3.1.2.9.3: every attribute but the Image Display
    Format is configurable.
    """

    #: Film Size ID (2010,0050), e.g. 14INX17IN, 8INX10IN, A4.
    film_size_id: str = "14INX17IN"
    #: Film Orientation (2010,0040): PORTRAIT or LANDSCAPE.
    film_orientation: str = "PORTRAIT"
    #: Magnification Type (2010,0060): REPLICATE, BILINEAR, CUBIC or NONE.
    magnification_type: str = ""
    #: Medium Type (2000,0030): PAPER, CLEAR FILM, BLUE FILM, ...
    medium_type: str = ""
    #: Film Destination (2000,0040): MAGAZINE or PROCESSOR.
    film_destination: str = ""
    #: Film Session Label (2000,0050).
    film_session_label: str = ""
    #: Number of Copies (2000,0010).
    number_of_copies: int = 1
    #: Print Priority (2000,0020): HIGH, MED or LOW.
    priority: str = "MED"
    #: Preformatted Grayscale Image depth: 8 or 12 bits.
    bits_stored: int = 8
    #: Presentation LUT Shape (IDENTITY or LIN OD); empty: no Presentation LUT.
    presentation_lut_shape: str = ""
    #: Border Density (2010,0100): BLACK, WHITE or hundredths of OD.
    border_density: str = ""
    #: Empty Image Density (2010,0110): BLACK, WHITE or hundredths of OD.
    empty_image_density: str = ""
    #: Min Density (2010,0120), hundredths of optical density; 0: not sent.
    min_density: int = 0
    #: Max Density (2010,0130), hundredths of optical density; 0: not sent.
    max_density: int = 0
    #: Trim (2010,0140): YES or NO; empty: not sent.
    trim: str = ""
    #: Configuration Information (2010,0150), printer-specific text.
    configuration_information: str = ""
    #: Annotation Display Format ID (2010,0030), sent when the job has an annotation.
    annotation_display_format_id: str = "ANNOTATION"
    #: Annotation Position (2030,0010) of the job's annotation text.
    annotation_position: int = 1
    #: Where the print N-ACTION goes: "film_box" (each film) or "film_session" (all at once).
    print_level: str = "film_box"
    #: Pixels per inch of the rendered images (the image box size in pixels follows from it).
    resolution_dpi: int = 150


@dataclass
class Config:
    agent: AgentSettings = field(default_factory=AgentSettings)
    storage: StorageConfig = field(default_factory=StorageConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    mpps: MppsConfig = field(default_factory=MppsConfig)
    gp: GeneralPurposeConfig = field(default_factory=GeneralPurposeConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    peers: dict[str, Peer] = field(default_factory=dict)
    #: ``[print.NAME]``: film attributes of the printer ``[peers.NAME]``.
    print: dict[str, PrintSettings] = field(default_factory=dict)

    # Shortcuts used everywhere.
    @property
    def timeouts(self) -> Timeouts:
        return self.agent.timeouts

    def peer_by_ae_title(self, ae_title: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.ae_title == ae_title:
                return peer
        return None


def _check_ae_title(value: str, key: str) -> str:
    if not 0 < len(value.strip()) <= 16 or "\\" in value or not value.isascii() \
            or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{key}: an AE title is 1 to 16 ASCII characters without '\\': {value!r}")
    return value.strip()


def _convert(value, hint, key: str):
    """Check one TOML value against a dataclass field's type."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {name: _convert(item, item_hint, f"{key}.{name}") for name, item in value.items()}
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls, table, prefix: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        values[name] = _convert(value, hints[name], key)
    for name, f in known.items():
        if name not in values and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{name}: required")
    return cls(**values)


def validate(config: Config) -> Config:
    """Checks across keys, after files and command-line overrides are applied."""
    agent = config.agent
    agent.ae_title = _check_ae_title(agent.ae_title, "agent.ae_title")
    if not 0 < agent.port < 65536:
        raise ConfigError(f"agent.port: must be 1 to 65535, got {agent.port}")
    if agent.max_pdu_length and agent.max_pdu_length < 4096:
        raise ConfigError("agent.max_pdu_length: 0 (unlimited) or at least 4096")
    if agent.max_pdu_send_length < 4096:
        raise ConfigError("agent.max_pdu_send_length: at least 4096")
    if not agent.transfer_syntax_order:
        raise ConfigError("agent.transfer_syntax_order: must name at least one transfer syntax")
    for name in ("artim", "dimse", "network"):
        if getattr(agent.timeouts, name) <= 0:
            raise ConfigError(f"agent.timeouts.{name}: must be positive")
    if config.retention.interval_hours <= 0:
        raise ConfigError("retention.interval_hours: must be positive")
    if config.storage.on_duplicate not in ("keep", "replace"):
        raise ConfigError(f"storage.on_duplicate: \"keep\" or \"replace\", "
                          f"not {config.storage.on_duplicate!r}")
    for name, peer in config.peers.items():
        peer.ae_title = _check_ae_title(peer.ae_title, f"peers.{name}.ae_title")
        if not 0 < peer.port < 65536:
            raise ConfigError(f"peers.{name}.port: must be 1 to 65535, got {peer.port}")
    for i, name in enumerate(config.mpps.forward_to):
        if name not in config.peers:
            raise ConfigError(f"mpps.forward_to[{i}]: no [peers.{name}] table")
    if not 0 < config.outbox.first_retry <= config.outbox.last_retry:
        raise ConfigError("outbox.first_retry: must be positive and at most outbox.last_retry")
    for name, settings in config.print.items():
        if name not in config.peers:
            raise ConfigError(f"print.{name}: no [peers.{name}] with the printer's address")
        check_print_settings(settings, f"print.{name}")
    return config


#: PS3.3 C.13.1 / C.13.3 enumerated values, and our own choices, per PrintSettings key.
_PRINT_CHOICES = {
    "film_orientation": ("PORTRAIT", "LANDSCAPE"),
    "priority": ("HIGH", "MED", "LOW"),
    "bits_stored": (8, 12),
    "presentation_lut_shape": ("", "IDENTITY", "LIN OD"),
    "trim": ("", "YES", "NO"),
    "print_level": ("film_box", "film_session"),
}


def check_print_settings(settings: PrintSettings, key: str) -> None:
    """The enumerated PrintSettings values, the film size and the numbers that must be > 0."""
    from dicomagent.printscu import film_size_mm
    for name, choices in _PRINT_CHOICES.items():
        if getattr(settings, name) not in choices:
            raise ConfigError(f"{key}.{name}: one of {', '.join(map(repr, choices))}, "
                              f"not {getattr(settings, name)!r}")
    if film_size_mm(settings.film_size_id) is None:
        raise ConfigError(f"{key}.film_size_id: not a Film Size ID of PS3.3 C.13.3 "
                          f"(e.g. 14INX17IN, 24CMX30CM, A4): {settings.film_size_id!r}")
    for name in ("number_of_copies", "resolution_dpi", "annotation_position"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{key}.{name}: must be at least 1")


def load_config(path: str | Path | None = None) -> Config:
    """The embedded defaults, overlaid with the TOML file at ``path`` if given."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return validate(_build(Config, table, ""))
