"""Helpers shared by the asyncio tests (UDP, serial, gateway)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from palisade_c.aio import Server, serve

T = TypeVar("T")


def run_bounded(coro: Coroutine[Any, Any, T], bound: float) -> T:
    """Run ``coro`` on a fresh loop, failing it after ``bound`` seconds instead of hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(bound):
            return await coro

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def served(url: str, *args: Any, **kwargs: Any) -> AsyncIterator[Server]:
    """``palisade_c.serve(url, ...)`` for the duration of a ``with`` block, closed after."""
    server = await serve(url, *args, **kwargs)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
