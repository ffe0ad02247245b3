"""The lease heartbeat: a worker renews the leases of the items it holds while it edits them.

A claim gives the worker a lease of ``Settings.lease_seconds``; the reconciler takes back items whose lease ran out.
Without renewal the lease would have to outlast the slowest edit. With it, a thread renews the leases every third
of the lease while the micro-batch is worked on (``transitions.renew_leases``, a conditional UPDATE that extends
only leases the worker still holds), so the lease only has to outlast the silence of a dead worker: when the
process dies, the heartbeat dies with it and the lease runs out. A failed renewal (say, the database is briefly
unreachable) is logged and tried again at the next beat; an item whose lease is no longer held is reported to
``on_lost`` once, and the caller drops its result instead of writing over the new holder's.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType

from sqlalchemy.orm import Session

from xmgie.jobs import transitions

logger = logging.getLogger(__name__)

HEARTBEATS_PER_LEASE = 3
"""Renewals per lease duration: two in a row may fail before a live worker's lease runs out."""


class LeaseHeartbeat:
    """Renews ``worker``'s leases of ``item_ids`` every ``lease_seconds / HEARTBEATS_PER_LEASE`` seconds on a
    daemon thread, from ``start()`` (or entering the ``with`` block) to ``stop()`` (leaving it).

    ``on_lost(item_id)`` is called from the heartbeat's thread, once per item, when a renewal finds that ``worker``
    no longer holds it: another worker took it over, the reconciler released it, or this worker already ended it
    (the heartbeat cannot tell these apart; the caller knows which items it has ended). Those items are not renewed
    again.
    """

    def __init__(
        self,
        *,
        session_factory: Callable[[], Session],
        item_ids: Iterable[uuid.UUID],
        worker: str,
        lease_seconds: float,
        on_lost: Callable[[uuid.UUID], None] | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / HEARTBEATS_PER_LEASE
        self.on_lost = on_lost
        self.renewals = 0
        """Renewals that reached the database (for tests and logs)."""
        self._held = set(item_ids)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LeaseHeartbeat:
        """Start beating (nothing to do without items)."""
        if self._held and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.worker}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and wait for a renewal in progress to end; the leases keep their last deadline."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> LeaseHeartbeat:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval) and self._held:
            self.renew_once()

    def renew_once(self) -> None:
        """Renew the held leases now; a failure is logged, an item no longer held is reported to ``on_lost``."""
        asked = sorted(self._held)
        try:
            with self.session_factory() as session, session.begin():
                renewed = set(
                    transitions.renew_leases(
                        session=session, item_ids=asked, worker=self.worker, lease_seconds=self.lease_seconds
                    )
                )
        except Exception:  # noqa: BLE001 - the next beat tries again; the leases still run for a while
            logger.warning(
                "renewing the leases of %d item(s) failed; trying again in %.1f s",
                len(asked),
                self.interval,
                exc_info=True,
            )
            return
        self.renewals += 1
        for item_id in asked:
            if item_id not in renewed:
                self._held.discard(item_id)
                if self.on_lost is not None:
                    self.on_lost(item_id)
