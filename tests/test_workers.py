"""A DataLoader's worker processes end with the loop that reads them (samcache.workers), however the
loop ends, instead of at whatever garbage collection reaches the iterator later."""

from __future__ import annotations

import gc
import multiprocessing
from contextlib import nullcontext

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from samcache.workers import batches_of


class _FailsAt(Dataset):
    def __init__(self, bad: int):
        self.bad = bad

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise ValueError(f"record {i} is damaged")
        return torch.full((4,), float(i))


def _workers_started_here(before: set) -> set:
    return set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("how", ["exception", "break", "end"])
def test_the_workers_have_exited_when_the_loop_is_left(how):
    before = set(multiprocessing.active_children())
    loader = DataLoader(_FailsAt(bad=2 if how == "exception" else -1), batch_size=2, num_workers=1)
    seen = []
    gc.disable()  # what the helper promises must not come from a collection
    try:
        with pytest.raises(ValueError, match="record 2 is damaged") if how == "exception" else nullcontext():
            with batches_of(loader) as batches:
                for batch in batches:
                    assert _workers_started_here(before), "the loader runs a worker process"
                    seen.append(batch[:, 0].tolist())
                    if how == "break":
                        break
        assert not _workers_started_here(before)
    finally:
        gc.enable()
    assert seen == {"exception": [[0.0, 1.0]], "break": [[0.0, 1.0]],
                    "end": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]}[how]


def test_a_loader_without_workers_reads_the_same_batches():
    with batches_of(DataLoader(_FailsAt(bad=-1), batch_size=4, num_workers=0)) as batches:
        assert [b[:, 0].tolist() for b in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]

