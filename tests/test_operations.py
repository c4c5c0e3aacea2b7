"""Production operation on real SSH hosts: orphaned kernels end themselves, per-user limits hold."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import env, eventually, kernel_processes

pytestmark = pytest.mark.asyncio


async def test_an_orphaned_kernel_ends_itself_and_a_polled_one_does_not(lab, managers):
    host = lab.hosts[0]
    orphan, polled = managers(orphan_timeout=3.0), managers(orphan_timeout=3.0)
    for km in (orphan, polled):
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        assert kernel_processes(host, km.kernel_id)

    async def poll_every_second() -> None:  # as jupyter_server's restarter polls every kernel it manages
        while True:
            assert await polled.is_alive()
            await asyncio.sleep(1.0)

    poller = asyncio.ensure_future(poll_every_second())
    try:
        # nobody polls `orphan` (its gateway "died"): it ends itself on its host after 3 s, alone
        assert await eventually(lambda: not kernel_processes(host, orphan.kernel_id), 20.0)
        await asyncio.sleep(4.0)  # more than the timeout again: the polled one is still there
        assert not poller.done()
        assert kernel_processes(host, polled.kernel_id)
        assert await polled.is_alive()
    finally:
        poller.cancel()
    assert not await orphan.is_alive()
