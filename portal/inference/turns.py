"""Fair turns at a shared, bounded resource: at most N holders, waiters served round robin by owner.

The serving path's database calls take turns here (one owner per API key, then per tenant), so a
tenant with 600 requests waiting gets one turn in each round, like a tenant with one: its backlog
never stands between another tenant and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable


class FairTurns:
    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, owner: Hashable) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(owner, deque()).append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # handed the slot just as it was cancelled
                    self._release()
                else:
                    self._forget(owner, future)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            owner, queue = self._waiting.popitem(last=False)  # the owner waiting longest for a turn
            future = queue.popleft()
            if queue:
                self._waiting[owner] = queue  # back of the line: one turn per owner per round
            if not future.done():
                future.set_result(None)  # the slot passes straight to it
                return
        self._free += 1

    def _forget(self, owner: Hashable, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[owner]
