"""The statistics the early-warning and lead-lag analyses report: Wilson intervals, a seeded bootstrap over groups,
Harrell's concordance with censoring, stratified, a slope with group fixed effects, mean ± stderr over seeds (every
table's and final_info.json's), and the Kaplan-Meier median with a bootstrap interval, for steps to an event that some
runs end before (censored: a mean over the runs that got there would read too early). NumPy only; definitions in
docs/analysis.md ("Early warning").
"""

import math

import numpy as np

Z95 = 1.959963984540054  # the normal 0.975 quantile
BOOTSTRAP = 2000  # resamples behind every bootstrap interval
BOOTSTRAP_SEED = 0  # intervals are the same on every run of the same inputs


def wilson(k: int, n: int, z: float = Z95) -> tuple:
    """(low, high) of the Wilson score interval for k successes in n trials; (nan, nan) when n is 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(groups: list, statistic, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple:
    """(low, high): the 2.5% and 97.5% percentiles of statistic(resample) over n resamples of the groups with
    replacement (a resample keeps len(groups) of them); resamples where the statistic is nan are dropped. (nan, nan)
    when fewer than 2 groups or no resample gives a number."""
    if len(groups) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n, len(groups)))
    values = np.array([statistic([groups[i] for i in pick]) for pick in picks], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def concordance_counts(times, events, scores) -> tuple:
    """(concordant, comparable) of Harrell's C over one stratum. A pair is comparable when the run with the shorter
    time had its event (the other may be censored later); concordant when that run has the higher score (higher:
    sooner), half when the scores tie. Runs whose score is nan are left out."""
    times, events, scores = (np.asarray(a, dtype=float) for a in (times, events, scores))
    keep = np.isfinite(scores) & np.isfinite(times)
    times, events, scores = times[keep], events[keep].astype(bool), scores[keep]
    earlier = (times[:, None] < times[None, :]) & events[:, None]  # i's event precedes j's time
    higher = scores[:, None] > scores[None, :]
    ties = scores[:, None] == scores[None, :]
    return float((earlier & higher).sum() + 0.5 * (earlier & ties).sum()), float(earlier.sum())


def concordance(strata: list) -> float:
    """Stratified Harrell's C: summed concordant over summed comparable pairs of [(concordant, comparable), ...];
    nan when no pair is comparable. Pairs are only ever formed within a stratum."""
    comparable = sum(c for _, c in strata)
    return sum(k for k, _ in strata) / comparable if comparable else float("nan")


def fixed_effects_slope(groups: list) -> float:
    """OLS slope of y on x with one intercept per group: [(x array, y array), ...], each demeaned within its group;
    nan when x does not vary within any group."""
    xs, ys = [], []
    for x, y in groups:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(x) >= 2:
            xs.append(x - x.mean())
            ys.append(y - y.mean())
    if not xs:
        return float("nan")
    x, y = np.concatenate(xs), np.concatenate(ys)
    spread = float((x * x).sum())
    return float((x * y).sum() / spread) if spread > 0 else float("nan")


def mean_stderr(values: np.ndarray):
    """Mean and stderr (ddof=1 std / sqrt(n)) over axis 0; stderr 0 for a single seed."""
    mean = values.mean(0)
    if len(values) < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(0, ddof=1) / np.sqrt(len(values))


def kaplan_meier(times, events) -> tuple:
    """(event times, survival just after each) of the Kaplan-Meier estimate: S(t) = prod over event times t_j <= t
    of (1 - d_j / n_j), d_j events at t_j among the n_j runs still at risk (a run censored at t_j counts as at risk
    there). events: True where the run's event happened at its time, False where it was censored then."""
    times, events = np.asarray(times, dtype=float), np.asarray(events, dtype=bool)
    steps = np.unique(times[events])
    at_risk = np.array([(times >= t).sum() for t in steps])
    deaths = np.array([(times[events] == t).sum() for t in steps])
    return steps, np.cumprod(1 - deaths / np.maximum(at_risk, 1))


def km_median(times, events) -> float:
    """The Kaplan-Meier median: the first event time at which the survival is at or below 0.5; inf when it never
    gets there (more than half the runs outlast the budget), nan with no runs."""
    if not len(times):
        return float("nan")
    steps, survival = kaplan_meier(times, events)
    below = np.flatnonzero(survival <= 0.5 + 1e-12)
    return float(steps[below[0]]) if len(below) else float("inf")


def km_median_interval(times, events, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple:
    """(low, high): the 2.5% and 97.5% order statistics of the Kaplan-Meier median over n resamples of the runs with
    replacement; a resample whose median is not reached counts as inf (not dropped), so high is inf when more than
    2.5% of resamples never reach it. (nan, nan) with fewer than 2 runs."""
    times, events = np.asarray(times, dtype=float), np.asarray(events, dtype=bool)
    if len(times) < 2:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(times), size=(n, len(times)))
    medians = np.array([km_median(times[p], events[p]) for p in picks])
    low, high = np.quantile(medians, [0.025, 0.975], method="inverted_cdf")
    return float(low), float(high)


def km_ratio_interval(times_a, events_a, times_b, events_b, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple:
    """(ratio, low, high): the Kaplan-Meier median of arm a over that of arm b (e.g. a baseline's steps over a
    method's: its speed-up), and the 2.5% / 97.5% order statistics over n resamples of each arm's runs with
    replacement, apart. inf where a's median is not reached and b's is; a resample where b's is not reached says
    nothing of the ratio and is dropped. (nan, nan) for the interval with fewer than 2 runs in an arm."""
    def ratio(a, b):
        return a / b if np.isfinite(b) else float("nan")

    times_a, events_a = np.asarray(times_a, dtype=float), np.asarray(events_a, dtype=bool)
    times_b, events_b = np.asarray(times_b, dtype=float), np.asarray(events_b, dtype=bool)
    point = ratio(km_median(times_a, events_a), km_median(times_b, events_b))
    if min(len(times_a), len(times_b)) < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pa = rng.integers(0, len(times_a), size=(n, len(times_a)))
    pb = rng.integers(0, len(times_b), size=(n, len(times_b)))
    values = np.array([ratio(km_median(times_a[i], events_a[i]), km_median(times_b[j], events_b[j]))
                       for i, j in zip(pa, pb)])
    values = values[~np.isnan(values)]
    if not len(values):
        return point, float("nan"), float("nan")
    low, high = np.quantile(values, [0.025, 0.975], method="inverted_cdf")
    return point, float(low), float(high)
