"""What the planner's modules share: the unit, the record of one check, the refusal, number formats."""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30


class PlanRefused(RuntimeError):
    """`thinkbroad run`: a stage cannot fit the cluster; the message gives the numbers and the fix."""


@dataclass
class Check:
    """One thing that must fit: an engine, a training job. `fits` False refuses the stage (GPU checks only)."""

    what: str
    device: str  # "gpu" | "cpu"
    placement: str
    lines: list[str] = field(default_factory=list)  # the arithmetic, one line each
    need_gib: float | None = None
    have_gib: float | None = None
    fits: bool = True
    problem: str = ""  # why not, with the number and the fix
    summary: str = ""  # one short phrase for the verdict line


def gib(b: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{b / GiB:.1f}"


def count(n: float) -> str:
    """1.4M, 91.5k, 12."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def hours(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"
