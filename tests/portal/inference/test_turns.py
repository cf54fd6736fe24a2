"""FairTurns: at most N holders; waiters served one turn per owner per round; cancellation loses no slot."""

from __future__ import annotations

import asyncio

from portal.inference.turns import FairTurns


def test_a_backlog_of_one_owner_does_not_delay_another():
    async def main() -> list[str]:
        turns, order, gate = FairTurns(1), [], asyncio.Event()

        async def work(owner: str, name: str) -> None:
            async with turns.turn(owner):
                order.append(name)
                await gate.wait()

        first = asyncio.create_task(work("a", "a0"))
        await asyncio.sleep(0)
        backlog = [asyncio.create_task(work("a", f"a{i}")) for i in range(1, 50)]
        await asyncio.sleep(0)
        late = asyncio.create_task(work("c", "c0"))  # arrives behind 49 of a's
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *backlog, late)
        return order

    order = asyncio.run(main())
    assert order.index("c0") <= 2 and len(order) == 51


def test_never_more_holders_than_slots_and_cancelled_waiters_give_nothing_away():
    async def main() -> tuple[int, int]:
        turns, holding, peak = FairTurns(3), [0], [0]

        async def work(owner: int) -> None:
            async with turns.turn(owner):
                holding[0] += 1
                peak[0] = max(peak[0], holding[0])
                await asyncio.sleep(0.001)
                holding[0] -= 1

        tasks = [asyncio.create_task(work(i % 5)) for i in range(60)]
        await asyncio.sleep(0)
        for task in tasks[10:20]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with turns.turn("after"):  # every slot came back
            async with turns.turn("after"):
                async with turns.turn("after"):
                    return peak[0], holding[0]

    peak, holding = asyncio.run(asyncio.wait_for(main(), 10))
    assert peak == 3 and holding == 0
