"""DataLoader worker processes that end with the loop reading them, however the loop ends.

A loop left by an exception (a damaged record, `--strict`, a non-finite loss) leaves its DataLoader
iterator inside the exception's reference cycle. torch shuts the iterator's workers down from its
`__del__`, so only when the garbage collector reaches that cycle: at a moment nobody chose, in
whatever runs then, and from there its shutdown waits out a 5 s join per worker (measured here: one
worker, 5.2 s inside `gc.collect()`, against 0.03 s for the same shutdown called as the loop ends).
A long-lived process (`samcache serve`'s fine-tune jobs, the test suite) would pay that stall and
keep idle workers alive until then; a command that exits does not, hence this helper for every
loader with workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.data import DataLoader


@contextmanager
def batches_of(loader: DataLoader) -> Iterator[Iterator]:
    """`with batches_of(loader) as batches: for batch in batches: ...`; its workers have exited when
    the `with` block is left, by the end of the data, a `break` or an exception."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        # The iterator without workers (num_workers=0) has nothing to shut down; the one with workers
        # shuts down once (a second call, from its __del__, does nothing).
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
