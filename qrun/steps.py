"""An epoch's training batches from a saved position, with a hook between two steps.

The engine's loop asks for the next batch only once the previous step (forward, backward, optimizer and
scheduler step) is complete, so the hook sees a consistent state: that is where a preemption stops, where a
mid-epoch checkpoint is written and where the divergence guard reads its flags.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator

# Test hook: seconds to sleep between steps, so a test can send a signal while an epoch is running.
STEP_DELAY_ENV = "QRUN_TEST_STEP_DELAY"


class EpochSteps:
    """Iterates `loader` (already positioned at batch `start`); `between(batches_done)` runs before each fetch
    and after the last step, and stops the epoch there when it returns True (then `stopped` is set)."""

    def __init__(self, loader: Iterable, start: int, between: Callable[[int], bool]) -> None:
        self.loader, self.start, self.between = loader, start, between
        self.batch = start  # batches of this epoch done so far
        self.stopped = False
        self.delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        # The engine applies a loader's on-device augmentation, when it has one; keep it visible.
        self.batch_augment: Any = getattr(loader, "batch_augment", None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            if self.delay and self.batch > self.start:
                time.sleep(self.delay)
            if self.between(self.batch):
                self.stopped = True
                return
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item
            self.batch += 1
