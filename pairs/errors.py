"""Input data that cannot be used: the error, and the listing of every bad row (the first MAX_REPORTED by position)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MAX_REPORTED = 20


class DataError(ValueError):
    """Input data that cannot be used. The message lists each bad row with its file, row and fix."""


def raise_problems(errors: list[str], count: int | None = None) -> None:
    """`N problem(s) in the input data:` and the first MAX_REPORTED of them (`count`: the total, if more were found
    than listed)."""
    count = len(errors) if count is None else count
    if count:
        more = f"\n... and {count - MAX_REPORTED} more" if count > MAX_REPORTED else ""
        raise DataError(f"{count} problem(s) in the input data:\n" + "\n".join(errors[:MAX_REPORTED]) + more)



@dataclass
class Problems:
    """Counts every problem of the rows and keeps the first MAX_REPORTED by position: key (file, record, order
    within the row), so the listing reads like the file whatever order the rows were checked in."""

    count: int = 0
    kept: list[tuple[tuple, str]] = field(default_factory=list)

    def wants(self, key: tuple) -> bool:
        """Whether a problem at `key` would be listed (else counting it is enough: no message to format)."""
        return len(self.kept) < MAX_REPORTED or key < self.kept[-1][0]

    def add(self, key: tuple, message: str) -> None:
        self.count += 1
        if self.wants(key):
            bisect.insort(self.kept, (key, message))
            del self.kept[MAX_REPORTED:]

    def raise_if_any(self) -> None:
        raise_problems([message for _, message in self.kept], self.count)

