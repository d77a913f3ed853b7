"""Retention: delete instances older than a period (seed 3.1.3.5.3).

"DICOM Agent can be configured to delete SOP instances that are older than a
period of time." The rule is ``[retention]`` of the configuration: an age in
days, optionally only for some calling AE titles, optionally only for
instances whose storage was committed. The daemon applies it periodically;
``dicomagent retention [--dry-run]`` applies it (or lists what it would
delete) at once. Each deletion removes the file and its index rows together,
crash-safely (``Archive.delete``).
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("dicomagent.retention")


def expired_instances(archive, rule, now: float | None = None) -> list[str]:
    """SOP Instance UIDs the rule says are too old (on the archive's worker)."""
    cutoff = (now or time.time()) - rule.max_age_days * 86400
    return archive.index.expired(cutoff, rule.calling_ae_titles or None, rule.only_committed)


def _delete_expired(archive, rule) -> list[str]:
    deleted = []
    for uid in expired_instances(archive, rule):
        if archive.delete(uid):
            deleted.append(uid)
    return deleted


def apply_retention(archive, rule, dry_run: bool = False) -> list[str]:
    """Delete (or, with ``dry_run``, list) what the rule says is too old."""
    if not rule.max_age_days:
        return []
    if dry_run:
        return archive.call(expired_instances, rule).result()
    return archive.call(_delete_expired, rule).result()


async def retention_loop(archive, rule) -> None:
    """The daemon's periodic task (only started when ``max_age_days`` is set)."""
    while True:
        try:
            deleted = await asyncio.wrap_future(archive.call(_delete_expired, rule))
            if deleted:
                log.info("retention: deleted %d instances older than %g days", len(deleted),
                         rule.max_age_days)
        except Exception as error:  # noqa: BLE001 - try again next time
            log.error("retention failed: %s", error)
        await asyncio.sleep(rule.interval_hours * 3600)
