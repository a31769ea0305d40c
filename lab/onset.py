"""When a measure leaves where it sat after memorisation: its band, its onset and a threshold alarm, on one run's
measurement grid. NumPy only; definitions and the choice of constants in docs/analysis.md ("Onsets").

A measure's post-memorisation band is [min, max] of its first BAND measurements at or after the memorisation step.
Its onset is the first measurement after the band that begins RUN consecutive measurements all above the band, or
all below it. Only the order of the values enters, so an onset does not move under any strictly monotone rescaling
of the measure (a log, a sign flip), and nothing after the onset's RUN measurements enters, so it does not move
with the budget. An alarm at level L (in band half-widths from the band's midpoint, in one direction) is raised at
the last of RUN consecutive measurements beyond L: the step at which it is known. Level 1 is the onset, read
causally.
"""

import numpy as np

BAND = 8  # measurements in the band: the memorisation step's (or the first after it) and the next 7
RUN = 5  # consecutive measurements beyond the band that make a departure


def grid_values(steps, values, grid) -> np.ndarray:
    """The series' last finite value at or before each grid step (nan before its first, and everywhere for a
    series with no finite value)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if not len(values):
        return np.full(len(grid), np.nan)
    at = np.searchsorted(steps, np.asarray(grid, dtype=float), side="right") - 1
    return np.where(at >= 0, values[np.maximum(at, 0)], np.nan)


def band(values) -> tuple | None:
    """(low, high) of the first BAND values, or None when there are fewer or one is not finite."""
    head = np.asarray(values[:BAND], dtype=float)
    if len(head) < BAND or not np.isfinite(head).all():
        return None
    return float(head.min()), float(head.max())


def deviation(values) -> np.ndarray | None:
    """The values after the band in band half-widths from its midpoint ((v - mid) / half; beyond +-1: outside the
    band). A band of one value (half-width 0) gives +-inf for any other value and nan for that value itself."""
    found = band(values)
    if found is None:
        return None
    low, high = found
    rest = np.asarray(values[BAND:], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rest - (low + high) / 2) / ((high - low) / 2)


def first_run(beyond: np.ndarray) -> int | None:
    """Index of the first of RUN consecutive True values, or None."""
    if len(beyond) < RUN:
        return None
    window = np.lib.stride_tricks.sliding_window_view(beyond, RUN).all(axis=1)
    hit = np.flatnonzero(window)
    return int(hit[0]) if len(hit) else None


def onset(grid, values) -> tuple | None:
    """(step, side) of the onset on a run's grid (grid[0]: the first measurement at or after memorisation), side +1
    (above the band) or -1 (below); None when the measure never leaves its band for RUN measurements."""
    z = deviation(values)
    if z is None:
        return None
    found = [(i, side) for side in (1, -1) if (i := first_run(side * z > 1)) is not None]
    if not found:
        return None
    i, side = min(found)
    return float(np.asarray(grid)[BAND + i]), side


def alarm(grid, z: np.ndarray, sign: int, level: float) -> float | None:
    """Step at which sign * deviation has stayed above level for RUN measurements (the last of them), or None."""
    i = first_run(sign * z > level)
    return None if i is None else float(np.asarray(grid)[BAND + i + RUN - 1])
