"""Test hooks: named points where a test can kill or hold a samcache process (inert otherwise)."""

from __future__ import annotations

import os
import signal
import time


def crash_point(name: str) -> None:
    """Test hook: `SAMCACHE_CRASH_AT=name:n` SIGKILLs this process the n-th time it passes `name`.

    The crash-safety test uses it to die at exact moments (mid-write, just before a rename...);
    it is inert unless the variable is set. Under torchrun, `SAMCACHE_CRASH_RANK=r` limits it
    to the process of rank r. `SAMCACHE_HOLD_AT=name:FILE` instead waits there for as long as
    FILE exists, so that the tests of one-writer-at-a-time can start a second writer while the
    first is still at work.
    """
    hold = os.environ.get("SAMCACHE_HOLD_AT")
    if hold and hold.partition(":")[0] == name:
        while os.path.exists(hold.partition(":")[2]):
            time.sleep(0.05)
    spec = os.environ.get("SAMCACHE_CRASH_AT")
    if not spec:
        return
    only_rank = os.environ.get("SAMCACHE_CRASH_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    crash_point.counts[name] = crash_point.counts.get(name, 0) + 1  # type: ignore[attr-defined]
    if crash_point.counts[name] >= int(count or 1):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


crash_point.counts = {}  # type: ignore[attr-defined]
