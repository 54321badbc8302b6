"""Tail: live copies of what relay accepts and delivers, for `/api/tail` subscribers.

This module owns the in-memory fan-out behind `relay tail` (SPEC §6): ingress
publishes one record per accepted event and the delivery lanes one per
attempt; each subscriber gets its own bounded queue. Publishing never blocks
and never fails: a subscriber that cannot keep up loses records (and is told
how many), rather than slowing ingest or delivery down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

QUEUE_RECORDS = 1000


class Subscription:
    """One subscriber's queue, optionally limited to one source."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_RECORDS)
        self.dropped = 0

    def offer(self, record: dict[str, Any]) -> None:
        if self.source is not None and record.get("source") != self.source:
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1


class Tail:
    """Publish records to every current subscriber."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    @property
    def listened(self) -> bool:
        """Whether anyone subscribes (publishers skip building records nobody reads)."""
        return bool(self._subscribers)

    def publish(self, kind: str, **fields: Any) -> None:
        if not self._subscribers:
            return
        record = {"kind": kind, **fields}
        for subscriber in self._subscribers:
            subscriber.offer(record)

    @contextlib.asynccontextmanager
    async def subscribe(self, source: str | None = None) -> AsyncIterator[Subscription]:
        subscription = Subscription(source)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
