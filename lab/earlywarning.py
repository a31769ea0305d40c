"""Which measures warn of grokking beyond what the configuration already says, and which move with it rather than
with a clock: the early-warning evaluation of a sweep (plot.py's earlywarning.csv and clock.csv). Definitions,
and why each choice, in docs/analysis.md ("Early warning", "The clock test").

Every run of a sweep that memorised is read on its measurement grid from memorisation on (lab.onset). Its outcome
for the alarms: *positive* when val accuracy reaches 0.5 within the budget (whether or not it then passes 0.99),
*negative* when it never does, its val accuracy ends no higher than 3x chance (not on its way up) and it was
watched at least the horizon; *censored* otherwise (rising at the budget, or watched too briefly);
*excluded* when val accuracy reached 0.5 inside the band (nothing is left to warn of). An alarm is a hit in a
positive run when it comes before val accuracy's 50% step, a false alarm in a negative run when it comes within the
horizon (the longest memorisation-to-50% time of the positive runs it was fitted on).

Rules are scored held out: a measure's direction and level, the fixed delay and the horizon are fitted on the
other cells (and, as a transfer check, on the other op); the config lookup reads the other seeds of the run's cell.
The primary statistic is within cells: the stratified concordance (Harrell's C) of each measure's value at fixed
offsets after memorisation against the time to grokking (censored at the budget), over the runs that have not yet
reached val accuracy 0.5 at that offset; a rule that reads only the configuration scores 0.5 there.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from lab import onset, stats
from lab.analysis import measure_label, measure_rows, measure_series, measurement_grid, read_examples
from lab.schema import HALF_AT as HALF, half_step, is_predictor, reads

LEVELS = (1, 1.5, 2, 3, 5, 8, 13, 20, 30, 50, 100)  # alarm levels, in band half-widths
OFFSETS = (200, 500, 1000)  # steps after memorisation at which the concordance reads each measure
PRIMARY = 500  # the offset that ranks the measures
CHANCE_TIMES = 3  # the reference "val accuracy at 3x chance"


# ----------------------------------------------------------------------------- one run
@dataclass
class WarnRun:
    """One job as the evaluation reads it: where it sits in the sweep, its steps, and every measure on its grid."""

    op: str
    cell: str
    seed: int
    memorisation_step: int
    half_step: int | None  # first evaluation with val acc >= HALF
    grok_step: int | None  # first with val acc > GROKKED_ABOVE
    last_step: int
    grid: np.ndarray  # measurement steps at or after memorisation
    series: dict  # (layer, split, metric) -> values on the grid
    rising: bool = False  # val accuracy ends (median over the last 10% of evaluations) above CHANCE_TIMES x chance
    chance: float | None = None  # 1 / classes
    config: dict = field(default_factory=dict)  # the cell's values (train_frac, weight_decay, lr)
    _alarms: dict = field(default_factory=dict, repr=False)

    @property
    def stratum(self) -> tuple:
        return self.op, self.cell

    @property
    def t50(self):
        """Steps from memorisation to val accuracy 0.5, or None."""
        return None if self.half_step is None else self.half_step - self.memorisation_step

    @property
    def span(self) -> int:
        return self.last_step - self.memorisation_step

    def status(self, horizon) -> str:
        """positive, negative, censored or excluded (module docstring)."""
        if len(self.grid) < onset.BAND or (self.half_step is not None and self.half_step <= self.grid[onset.BAND - 1]):
            return "excluded"
        if self.half_step is not None:
            return "positive"
        if self.rising or horizon is None or self.span < horizon:
            return "censored"
        return "negative"

    def alarm_steps(self, key, sign: int, scale: str = "band") -> tuple:
        """(running maximum of the lowest sign * x in each RUN-long window, the grid step at which each window ends),
        x the deviation from the band in half-widths after the band (scale "band"), or the value itself from
        memorisation on ("value"): the alarm at level L is the first step whose maximum exceeds L."""
        if (key, sign, scale) not in self._alarms:
            values = self.series.get(key)
            x = None if values is None else onset.deviation(values) if scale == "band" else np.asarray(values)
            if x is None or len(x) < onset.RUN:
                self._alarms[key, sign, scale] = None
            else:
                low = np.lib.stride_tricks.sliding_window_view(np.nan_to_num(sign * x, nan=-np.inf), onset.RUN).min(1)
                first = onset.BAND if scale == "band" else 0
                self._alarms[key, sign, scale] = (np.maximum.accumulate(low), self.grid[first + onset.RUN - 1:])
        return self._alarms[key, sign, scale]

    def alarm(self, key, sign: int, level: float, scale: str = "band"):
        """Steps since memorisation at which the alarm in direction sign is raised: sign * x above level for RUN
        measurements (alarm_steps), or None."""
        found = self.alarm_steps(key, sign, scale)
        if found is None:
            return None
        peak, steps = found
        i = int(np.searchsorted(peak, level, side="right"))
        return None if i >= len(peak) else float(steps[i] - self.memorisation_step)

    def value_at(self, key, offset: int) -> float:
        """The measure at the last grid step at or before memorisation + offset (nan when unknown)."""
        if key not in self.series:
            return float("nan")
        i = int(np.searchsorted(self.grid, self.memorisation_step + offset, side="right")) - 1
        return float(self.series[key][i]) if i >= 0 else float("nan")

    def onset(self, key):
        """(steps since memorisation, side) of the measure's onset (lab.onset), or None."""
        found = onset.onset(self.grid, self.series[key]) if key in self.series else None
        return None if found is None else (found[0] - self.memorisation_step, found[1])


def warn_run(pair, cell: str, config: dict, chance, measured: list | None = None, keys=None) -> WarnRun | None:
    """The WarnRun of one job (lab.analysis.TrainedJob), or None when it never memorised; `measured`: the measures
    plugin's rows while it trains (lab.analysis.measure_rows); keys: only these measures' series (and val acc)."""
    mem = pair.memorisation_step
    if mem is None:
        return None
    rows = measure_rows(pair, measured)
    grid = measurement_grid(pair, rows, mem)
    series = {k: onset.grid_values(steps, values, grid) for k, (steps, values) in measure_series(pair, rows).items()
              if k != ("log", "train", "acc") and (keys is None or k in keys or k == ("log", "val", "acc"))}
    half = half_step(pair.log)
    tail = float(np.median([r["val_acc"] for r in pair.log[-max(1, len(pair.log) // 10):]]))
    rising = chance is not None and tail > CHANCE_TIMES * chance
    return WarnRun(pair.op, cell, pair.seed, mem, half, pair.grok_step, pair.log[-1]["step"], grid, series,
                   rising, chance, config)


def chance_of(folder: str):
    """1 / the number of answer classes, from the job's examples.parquet (None without one)."""
    try:
        labels, _ = read_examples(folder)
    except (OSError, ValueError, KeyError):
        return None
    return 1 / len(np.unique(labels)) if len(labels) else None


CONFIG_FIELDS = ("train_frac", "weight_decay", "lr")


def sweep_runs(sweep: dict) -> list:
    """WarnRun of every finished job of a sweep (lab.phases.load_sweep) that memorised."""
    runs = []
    for cell in sweep["cells"]:
        config = {k: cell["config"][k] for k in CONFIG_FIELDS if k in cell.get("config", {})}
        for pair in cell["pairs"]:
            run = warn_run(pair, cell["name"], {**config, **cell["values"]}, chance_of(pair.folder))
            if run is not None:
                runs.append(run)
    return runs


# ----------------------------------------------------------------------------- rules
def horizon(runs: list):
    """The longest memorisation-to-val-acc-0.5 time over the positive runs (None when there are none)."""
    times = [r.t50 for r in runs if r.status(0) == "positive"]
    return max(times) if times else None


def labelled(runs: list, window) -> tuple:
    """(positives, negatives) of runs under the horizon `window`."""
    status = [(r, r.status(window)) for r in runs]
    return [r for r, s in status if s == "positive"], [r for r, s in status if s == "negative"]


def judge(run: WarnRun, alarm, window) -> str | None:
    """hit / miss (a positive run), false alarm / quiet (a negative one), None (censored or excluded)."""
    status = run.status(window)
    if status == "positive":
        return "hit" if alarm is not None and alarm < run.t50 else "miss"
    if status == "negative":
        return "false alarm" if alarm is not None and alarm <= window else "quiet"
    return None


def youden(positives: list, negatives: list, alarm_of, window) -> float:
    hits = sum(judge(r, alarm_of(r), window) == "hit" for r in positives)
    false = sum(judge(r, alarm_of(r), window) == "false alarm" for r in negatives)
    return hits / len(positives) - false / len(negatives)


class Measure:
    """A measure as an alarm: in one direction, at one level of LEVELS, both fitted to the best J on the training
    runs (ties: more hits, then up before down, then the lower level: of two rules that are equally useless, the
    one that alarms says more); as a score, its value at an offset."""

    alarms = True

    def __init__(self, key):
        self.key, self.reads, self.name = key, reads(*key), measure_label(*key)

    def fit(self, train: list, window):
        positives, negatives = labelled([r for r in train if self.reads_run(r)], window)
        if not positives or not negatives:
            return None
        best = None
        for sign in (1, -1):
            for level in LEVELS:
                alarms = [r.alarm(self.key, sign, level) for r in positives]
                hits = sum(a is not None and a < r.t50 for a, r in zip(alarms, positives))
                score = (youden(positives, negatives, lambda r: r.alarm(self.key, sign, level), window), hits)
                if best is None or score > best[0]:
                    best = (score, sign, level)
        return {"sign": best[1], "level": best[2]}

    def reads_run(self, run: WarnRun) -> bool:
        return self.key in run.series

    def alarm(self, run: WarnRun, fitted, peers):
        return None if fitted is None else run.alarm(self.key, fitted["sign"], fitted["level"])

    def score(self, run: WarnRun, offset: int, peers) -> float:
        return run.value_at(self.key, offset)


class MeasureValue(Measure):
    """The same measure with a threshold on its value, not on its own noise: alarm when sign * value has been above
    sign * threshold for RUN measurements from memorisation on; direction and threshold (a 5% to 95% quantile of
    the training runs' values after memorisation) fitted to the best J as Measure's. It does not transfer across
    setups whose scales differ; it shows what a threshold in noise units gives up."""

    QUANTILES = np.linspace(0.05, 0.95, 19)

    def fit(self, train: list, window):
        mine = [r for r in train if self.reads_run(r)]
        positives, negatives = labelled(mine, window)
        if not positives or not negatives:
            return None
        values = np.concatenate([r.series[self.key] for r in mine])
        values = values[np.isfinite(values)]
        best = None
        for sign in (1, -1):
            for threshold in np.unique(np.quantile(values, self.QUANTILES)):
                def alarm_of(r):
                    return r.alarm(self.key, sign, sign * threshold, "value")
                hits = sum(a is not None and a < r.t50 for a, r in ((alarm_of(r), r) for r in positives))
                score = (youden(positives, negatives, alarm_of, window), hits)
                if best is None or score > best[0]:
                    best = (score, sign, float(threshold))
        return {"sign": best[1], "threshold": best[2]}

    def alarm(self, run: WarnRun, fitted, peers):
        return None if fitted is None else run.alarm(self.key, fitted["sign"], fitted["sign"] * fitted["threshold"],
                                                     "value")


class ConfigLookup:
    """Alarm at memorisation when more than half the run's peers (the other seeds of its cell; under the op
    protocol, its cell's runs of the other op) reached val accuracy 0.5; score: that share. Reads no measurement."""

    key, reads, name, alarms = ("baseline", "config", "config_lookup"), "config", "config lookup", True

    @staticmethod
    def reads_run(run) -> bool:
        return True

    def fit(self, train: list, window):
        return None

    @staticmethod
    def share(peers: list) -> float:
        return sum(p.half_step is not None for p in peers) / len(peers) if peers else float("nan")

    def alarm(self, run, fitted, peers):
        return 0.0 if self.share(peers) > 0.5 else None

    def score(self, run, offset, peers) -> float:
        return self.share(peers)  # given the whole cell: one value per cell, so C is 0.5 within cells


class FixedDelay:
    """Alarm a fixed number of steps after memorisation, fitted to the best J (ties: the shorter) among 0, the
    training runs' memorisation-to-0.5 times and just past the horizon; score: the same in every run."""

    key, reads, name, alarms = ("baseline", "config", "fixed_delay"), "config", "fixed delay after memorisation", True

    @staticmethod
    def reads_run(run) -> bool:
        return True

    def fit(self, train: list, window):
        positives, negatives = labelled(train, window)
        if not positives or not negatives:
            return None
        delays = sorted({0.0, *(float(r.t50) for r in positives), float(window) + 1})
        best = max((youden(positives, negatives, lambda r: d, window), -d) for d in delays)
        return {"delay": -best[1]}

    def alarm(self, run, fitted, peers):
        return None if fitted is None or fitted["delay"] > run.span else fitted["delay"]

    def score(self, run, offset, peers) -> float:
        return 0.0


class MemorisationStep:
    """Score: the memorisation step (direction fitted: does a run that memorises sooner grok sooner?); reads the
    training pairs. Concordance only: it is known at memorisation and raises no alarm."""

    key, reads, name, alarms = ("baseline", "train", "memorisation_step"), "train", "memorisation step", False

    @staticmethod
    def reads_run(run) -> bool:
        return True

    def fit(self, train, window):
        return None

    def alarm(self, run, fitted, peers):
        return None

    def score(self, run, offset, peers) -> float:
        return float(run.memorisation_step)


class ValAccChance:
    """The trivial reference: alarm when val accuracy has been above CHANCE_TIMES x chance for RUN measurements
    from memorisation on; score: val accuracy at the offset. Reads validation labels."""

    key, reads, alarms = ("baseline", "val_labels", "val_acc_3x_chance"), "val_labels", True
    name = f"val acc > {CHANCE_TIMES}x chance"

    @staticmethod
    def reads_run(run) -> bool:
        return True

    def fit(self, train: list, window):
        return None

    def alarm(self, run, fitted, peers):
        val = run.series.get(("log", "val", "acc"))
        if val is None or run.chance is None:
            return None
        i = onset.first_run(val > CHANCE_TIMES * run.chance)
        return None if i is None else float(run.grid[i + onset.RUN - 1] - run.memorisation_step)

    def score(self, run, offset, peers) -> float:
        return run.value_at(("log", "val", "acc"), offset)


BASELINES = (ConfigLookup(), FixedDelay(), MemorisationStep(), ValAccChance())


# ----------------------------------------------------------------------------- protocols
def folds(runs: list, by: str) -> list:
    """[(training runs, held-out runs), ...]: leave one cell out (by "cell": every op's runs of that cell) or one
    op out (by "op")."""
    names = sorted({getattr(r, by) for r in runs})
    return [([r for r in runs if getattr(r, by) != n], [r for r in runs if getattr(r, by) == n]) for n in names]


def peers_of(run: WarnRun, runs: list, by: str) -> list:
    """The runs the config lookup reads for `run`: the other seeds of its (op, cell), or under the op protocol
    its cell's runs of the other ops."""
    if by == "op":
        return [r for r in runs if r.cell == run.cell and r.op != run.op]
    return [r for r in runs if r.stratum == run.stratum and r is not run]


def held_out(rule, runs: list, by: str) -> list:
    """[(run, verdict, lead, fitted), ...]: every run judged with the rule fitted on its fold's training runs and
    the horizon of those runs; verdict of judge(), lead = t50 - alarm for a hit."""
    out = []
    for train, held in folds(runs, by):
        window = horizon(train)
        fitted = rule.fit(train, window)
        for run in held:
            if not rule.reads_run(run):  # a measure this run lacks (RQI of x-y): not a quiet run, no run at all
                continue
            alarm = rule.alarm(run, fitted, peers_of(run, runs, by))
            verdict = judge(run, alarm, window)
            if verdict is not None:
                out.append((run, verdict, run.t50 - alarm if verdict == "hit" else None, fitted))
    return out


def _by_stratum(judged: list) -> list:
    """Per (op, cell): [hits, positives, false alarms, negatives, summed leads of the hits]."""
    strata = {}
    for run, verdict, lead, _ in judged:
        strata.setdefault(run.stratum, np.zeros(5))[:] += [
            verdict == "hit", verdict in ("hit", "miss"), verdict == "false alarm",
            verdict in ("false alarm", "quiet"), lead or 0.0]
    return list(strata.values())


def _j(sums) -> float:
    return sums[0] / sums[1] - sums[2] / sums[3] if sums[1] and sums[3] else float("nan")


def _lead(sums) -> float:
    return sums[4] / sums[0] if sums[0] else float("nan")


def alarm_rates(judged: list) -> dict:
    """Hit and false-alarm rates with Wilson intervals; J and the hits' mean lead with a bootstrap over cells."""
    groups = _by_stratum(judged)
    total = np.sum(groups, 0) if groups else np.zeros(5)
    hits, positives, false, negatives = (int(x) for x in total[:4])
    return {"positives": positives, "negatives": negatives, "hits": hits, "false_alarms": false,
            "hit_rate": hits / positives if positives else float("nan"),
            **dict(zip(("hit_lo", "hit_hi"), stats.wilson(hits, positives))),
            "false_alarm_rate": false / negatives if negatives else float("nan"),
            **dict(zip(("false_alarm_lo", "false_alarm_hi"), stats.wilson(false, negatives))),
            "J": _j(total), **dict(zip(("J_lo", "J_hi"), stats.bootstrap(groups, lambda g: _j(np.sum(g, 0))))),
            "lead": _lead(total),
            **dict(zip(("lead_lo", "lead_hi"), stats.bootstrap(groups, lambda g: _lead(np.sum(g, 0)))))}


def at_risk(run: WarnRun, offset: int) -> bool:
    """Not yet at val accuracy 0.5 at memorisation + offset."""
    return run.t50 is None or run.t50 > offset


def grok_time(run: WarnRun) -> tuple:
    """(time, event): steps from memorisation to grokking, or to the budget's end (censored)."""
    return (run.grok_step - run.memorisation_step, True) if run.grok_step is not None else (run.span, False)


def _stratum_counts(rule, runs: list, everyone: list, offset: int, sign: int) -> dict:
    """(op, cell) -> (concordant, comparable) of sign * score over its runs at risk at the offset."""
    out = {}
    for stratum in sorted({r.stratum for r in runs}):
        mine = [r for r in runs if r.stratum == stratum and at_risk(r, offset)]
        if len(mine) >= 2:
            times, events = zip(*(grok_time(r) for r in mine))
            whole = [r for r in everyone if r.stratum == stratum]  # the config lookup's score: the cell's own rate
            scores = [sign * rule.score(r, offset, whole) for r in mine]
            out[stratum] = stats.concordance_counts(times, events, scores)
    return out


def concordance(rule, runs: list, offset: int) -> dict:
    """Held-out stratified C at one offset: each cell's direction is the one that orders the other cells' runs
    better (C >= 0.5 there), then the cell's own pairs are counted; the bootstrap resamples cells."""
    strata = {}
    for train, held in folds(runs, "cell"):
        sign = -1 if stats.concordance(list(_stratum_counts(rule, train, runs, offset, 1).values())) < 0.5 else 1
        strata.update(_stratum_counts(rule, held, runs, offset, sign))
    counts = [c for c in strata.values() if c[1]]
    low, high = stats.bootstrap(counts, stats.concordance)
    return {f"c_{offset}": stats.concordance(counts), f"c_{offset}_lo": low, f"c_{offset}_hi": high,
            f"c_{offset}_pairs": int(sum(c[1] for c in counts))}


def judged_as_is(rule, runs: list, window) -> list:
    """held_out()'s [(run, verdict, lead, None), ...] for a rule used as it is, nothing fitted (a frozen rule, or
    the config lookup reading the other seeds of each run's cell): every run judged at the given horizon."""
    out = []
    for run in runs:
        if rule.reads_run(run):
            alarm = rule.alarm(run, None, peers_of(run, runs, "cell"))
            verdict = judge(run, alarm, window)
            if verdict is not None:
                out.append((run, verdict, run.t50 - alarm if verdict == "hit" else None, None))
    return out


def scores_as_is(rule, runs: list, window) -> dict:
    """alarm_rates() and the within-cell C at each offset of a rule used as it is: its score's direction is its
    own (a frozen rule's sign is in its score), not chosen on other cells."""
    row = alarm_rates(judged_as_is(rule, runs, window))
    for offset in OFFSETS:
        counts = [c for c in _stratum_counts(rule, runs, runs, offset, 1).values() if c[1]]
        low, high = stats.bootstrap(counts, stats.concordance)
        row.update({f"c_{offset}": stats.concordance(counts), f"c_{offset}_lo": low, f"c_{offset}_hi": high,
                    f"c_{offset}_pairs": int(sum(c[1] for c in counts))})
    return row


def role(kind: str) -> str:
    """baseline (reads the configuration), predictor (reads no validation labels) or reference (reads them, or
    the final model)."""
    return "baseline" if kind == "config" else "predictor" if is_predictor(kind) else "reference"


def score_rule(rule, runs: list) -> dict:
    """Every statistic of one rule: alarms held out by cell and by op, the concordance at each offset."""
    by_cell = held_out(rule, runs, "cell") if rule.alarms else []
    row = {"measure": rule.name, "layer": rule.key[0], "split": rule.key[1], "metric": rule.key[2],
           "reads": rule.reads, "role": "baseline" if rule.key[0] == "baseline" and rule.reads != "val_labels"
           else role(rule.reads),
           **alarm_rates(by_cell)}
    by_op = alarm_rates(held_out(rule, runs, "op")) if rule.alarms and len({r.op for r in runs}) > 1 else {}
    row.update({f"J_op{s}": by_op.get(f"J{s}", float("nan")) for s in ("", "_lo", "_hi")})
    value = alarm_rates(held_out(MeasureValue(rule.key), runs, "cell")) if isinstance(rule, Measure) else {}
    row.update({f"{k}_value": value.get(k, float("nan")) for k in ("J", "J_lo", "J_hi", "hits", "false_alarms")})
    fits = [f for *_, f in by_cell if f]
    row["direction"] = _mode(["up" if f["sign"] > 0 else "down" for f in fits if "sign" in f])
    row["level"] = _mode([f"{f['level']:g}" for f in fits if "level" in f])
    row["delay"] = _mode([f"{f['delay']:g}" for f in fits if "delay" in f])
    for offset in OFFSETS:
        row.update(concordance(rule, runs, offset))
    return row


def _mode(values: list) -> str:
    """The most common value (ties: the first in sorted order), or ''."""
    return max(sorted(set(values)), key=values.count) if values else ""


def keys_of(runs: list) -> list:
    return sorted({k for r in runs for k in r.series})


def earlywarning_table(runs: list) -> list:
    """score_rule() of every baseline and measure: baselines, predictors, references, each by held-out C at PRIMARY
    (high first), then J."""
    rows = [score_rule(rule, runs) for rule in [*BASELINES, *(Measure(k) for k in keys_of(runs))]]
    order = {"baseline": 0, "predictor": 1, "reference": 2}
    return sorted(rows, key=lambda t: (order[t["role"]], -_num(t[f"c_{PRIMARY}"]), -_num(t["J"]), t["measure"]))


def _num(x) -> float:
    return -2.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def tally(runs: list) -> dict:
    """How many runs are positive, negative, censored (of them still rising at the budget) and excluded under the
    horizon of all positives, and that horizon."""
    window = horizon(runs)
    status = [r.status(window) for r in runs]
    return {**{s: status.count(s) for s in ("positive", "negative", "censored", "excluded")},
            "rising": sum(r.rising and s == "censored" for r, s in zip(runs, status)), "horizon": window}


# ----------------------------------------------------------------------------- the clock test
FAMILIES = {  # name -> (the field it moves, what it holds fixed)
    "train_frac at fixed lr*wd": ("train_frac", "lr_wd"),
    "lr*wd at fixed train_frac": ("lr_wd", "train_frac"),
}


def _cell_key(run: WarnRun, moved: str, fixed: str) -> tuple:
    values = {**run.config, "lr_wd": round(run.config.get("lr", 0) * run.config.get("weight_decay", 0), 12)}
    others = tuple(sorted((k, v) for k, v in values.items() if k not in (moved, fixed, "lr", "weight_decay")))
    return (run.op, values.get(fixed), others), values.get(moved)


def clock_groups(runs: list, key, moved: str, fixed: str) -> list:
    """[[(val onsets, measure onsets) per cell], ...] per group of cells that differ only in `moved`: the positive
    runs with both onsets, cells with at least 2 of them, groups with at least 2 such cells."""
    cells = {}
    for run in runs:
        if run.status(0) != "positive":
            continue
        val, mine = run.onset(("log", "val", "acc")), run.onset(key)
        if val is None or mine is None:
            continue
        group, value = _cell_key(run, moved, fixed)
        cells.setdefault(group, {}).setdefault(value, []).append((val[0], mine[0]))
    return [[np.array(v, dtype=float) for _, v in sorted(c.items()) if len(v) >= 2]
            for _, c in sorted(cells.items(), key=lambda kv: str(kv[0]))
            if sum(len(v) >= 2 for v in c.values()) >= 2]


def _slope(groups: list) -> float:
    return stats.fixed_effects_slope([(np.array([c[:, 0].mean() for c in g]), np.array([c[:, 1].mean() for c in g]))
                                      for g in groups])


def clock_slope(groups: list, n: int = stats.BOOTSTRAP, seed: int = stats.BOOTSTRAP_SEED) -> tuple:
    """(slope, low, high): the fixed-effects slope of the cells' mean measure onset on their mean val-accuracy
    onset; the interval from resampling each cell's runs."""
    slope = _slope(groups)
    if math.isnan(slope):
        return slope, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [_slope([[c[rng.integers(0, len(c), len(c))] for c in g] for g in groups]) for _ in range(n)]
    draws = np.array(draws)[np.isfinite(draws)]
    low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (float("nan"),) * 2
    return slope, float(low), float(high)


def verdict(low: float, high: float) -> str:
    """coupled (the interval is above 0), opposite (below 0), clock (it holds 0 and is below 1), else unclear."""
    if math.isnan(low):
        return ""
    return "coupled" if low > 0 else "opposite" if high < 0 else "clock" if high < 1 else "unclear"


def onset_leads(runs: list, key) -> dict:
    """Over the positive runs with both onsets: val accuracy's onset minus the measure's (positive: the measure
    leaves its band first), mean with a bootstrap interval over cells, and how many lead."""
    by_cell = {}
    for run in runs:
        if run.status(0) == "positive":
            val, mine = run.onset(("log", "val", "acc")), run.onset(key)
            if val is not None and mine is not None:
                by_cell.setdefault(run.stratum, []).append(val[0] - mine[0])
    groups = [np.array([sum(v), len(v)], dtype=float) for v in by_cell.values()]
    leads = [x for v in by_cell.values() for x in v]
    low, high = stats.bootstrap(groups, lambda g: (lambda s: s[0] / s[1])(np.sum(g, 0)))
    return {"onset_lead": float(np.mean(leads)) if leads else float("nan"), "onset_lead_lo": low,
            "onset_lead_hi": high, "leads": sum(x > 0 for x in leads), "onset_runs": len(leads)}


def clock_table(runs: list) -> list:
    """clock.csv: per measure, its onset lead over the positive runs and, per family present in the sweep, its
    clock slope with an interval."""
    rows = []
    for key in keys_of(runs):
        row = {"measure": measure_label(*key), "layer": key[0], "split": key[1], "metric": key[2],
               "reads": reads(*key), **onset_leads(runs, key)}
        for family, (moved, fixed) in FAMILIES.items():
            groups = clock_groups(runs, key, moved, fixed)
            slope, low, high = clock_slope(groups)
            rows.append({**row, "family": family, "slope": slope, "slope_lo": low, "slope_hi": high,
                         "cells": sum(len(g) for g in groups), "runs": sum(len(c) for g in groups for c in g),
                         "verdict": verdict(low, high)})
    return rows


EARLYWARNING_COLUMNS = [
    "run", "measure", "layer", "split", "metric", "reads", "role", "positives", "negatives", "hits", "hit_rate",
    "hit_lo", "hit_hi", "false_alarms", "false_alarm_rate", "false_alarm_lo", "false_alarm_hi", "J", "J_lo", "J_hi",
    "J_op", "J_op_lo", "J_op_hi", "lead", "lead_lo", "lead_hi", "J_value", "J_lo_value", "J_hi_value", "hits_value",
    "false_alarms_value",
    *(f"c_{o}{s}" for o in OFFSETS for s in ("", "_lo", "_hi", "_pairs")), "direction", "level", "delay"]
CLOCK_COLUMNS = ["run", "measure", "layer", "split", "metric", "reads", "onset_lead", "onset_lead_lo",
                 "onset_lead_hi", "leads", "onset_runs", "family", "slope", "slope_lo", "slope_hi", "cells", "runs",
                 "verdict"]


# ----------------------------------------------------------------------------- words
def interval(value, low, high, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = fmt.format(value)
    return text if math.isnan(low) else f"{text} [{fmt.format(low)}, {fmt.format(high)}]"


def rule_text(t: dict) -> str:
    """'name (reads X): C500 0.62 [0.51, 0.72]; J 0.30 [0.10, 0.48], hits 12/20, false alarms 3/18'."""
    c = interval(t[f"c_{PRIMARY}"], t[f"c_{PRIMARY}_lo"], t[f"c_{PRIMARY}_hi"])
    j = interval(t["J"], t["J_lo"], t["J_hi"])
    alarms = (f"; J {j}, hits {t['hits']}/{t['positives']}, false alarms {t['false_alarms']}/{t['negatives']}"
              if not math.isnan(t["J"]) else "")
    if _finite(t["J_value"]):
        alarms += f"; J on the value {interval(t['J_value'], t['J_lo_value'], t['J_hi_value'])}"
    return f"{t['measure']} (reads {t['reads']}): C{PRIMARY} {c}{alarms}"


def markdown(sweep_run: str, table: list, clock: list, counts: dict) -> list:
    """The early-warning section of a sweep in analysis_summary.md."""
    lines = [f"### Early warning ({counts['positive']} runs that reach val acc {HALF}, {counts['negative']} that never "
             f"do and stay flat, {counts['censored']} censored ({counts['rising']} still rising at the budget), "
             f"{counts['excluded']} excluded (val acc {HALF} inside the post-memorisation band))", "",
             f"C{{offset}}: held-out stratified concordance within (op, cell) of the measure's value that many steps "
             "after memorisation with the time to grokking (censored at the budget; runs not yet at val acc 0.5); "
             "0.5 is chance and what a rule that reads only the configuration scores. J: held-out hit rate - "
             "false-alarm rate, thresholds in the run's own noise units fitted leaving one cell out (J_op: one op out; "
             "J on the value: a threshold on the measure's value instead). 95% intervals: "
             "bootstrap over cells (C, J, lead), Wilson (rates). reads: what the measure reads (predictor: no "
             "validation labels).", "",
             "| role | measure | reads | " + " | ".join(f"C{o}" for o in OFFSETS)
             + " | J | J, other op | J, on the value | hit rate | false-alarm rate | lead (steps) |",
             "|---" * (9 + len(OFFSETS)) + "|"]
    for t in table:
        cs = " | ".join(interval(t[f"c_{o}"], t[f"c_{o}_lo"], t[f"c_{o}_hi"]) for o in OFFSETS)
        lines.append(f"| {t['role']} | {t['measure']} | {t['reads']} | {cs} | {interval(t['J'], t['J_lo'], t['J_hi'])}"
                     f" | {interval(t['J_op'], t['J_op_lo'], t['J_op_hi'])} | "
                     f"{interval(t['J_value'], t['J_lo_value'], t['J_hi_value'])} | "
                     f"{interval(t['hit_rate'], t['hit_lo'], t['hit_hi'], '{:.0%}')} ({t['hits']}/{t['positives']}) | "
                     f"{interval(t['false_alarm_rate'], t['false_alarm_lo'], t['false_alarm_hi'], '{:.0%}')} "
                     f"({t['false_alarms']}/{t['negatives']}) | "
                     f"{interval(t['lead'], t['lead_lo'], t['lead_hi'], '{:.0f}')} |")
    lines.append("")
    if clock:
        lines += ["### Onsets and the clock test", "",
                  "Onset lead: val accuracy's onset minus the measure's (steps; positive: it leaves its "
                  "post-memorisation band first), over the runs that reach val acc 0.5. Slope: of the cells' mean "
                  "onset against their mean val-accuracy onset (about 1: moves with grokking; about 0: a clock).", "",
                  "| measure | reads | onset lead (steps) | leads in | "
                  + " | ".join(f"slope, {f}" for f in FAMILIES) + " |", "|---" * (4 + len(FAMILIES)) + "|"]
        by_measure = {}
        for c in clock:
            by_measure.setdefault(c["measure"], []).append(c)
        for name, rows in sorted(by_measure.items(), key=lambda kv: -_num(kv[1][0]["onset_lead"])):
            first = rows[0]
            slopes = " | ".join(f"{interval(c['slope'], c['slope_lo'], c['slope_hi'])} {c['verdict']}".strip()
                                for c in rows)
            lines.append(f"| {name} | {first['reads']} | "
                         f"{interval(first['onset_lead'], first['onset_lead_lo'], first['onset_lead_hi'], '{:.0f}')} | "
                         f"{first['leads']}/{first['onset_runs']} | {slopes} |")
        lines.append("")
    return lines


def _names(names: list, k: int = 6) -> str:
    return "none" if not names else ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def notes(sweep_run: str, table: list, clock: list, counts: dict) -> list:
    """The early-warning lines of a sweep in the notes.txt block, as a paper would need them: the run counts, the
    baselines, the verdict against them, the best predictors and references with intervals, the clock test."""
    if not table:
        return []
    by_metric = {t["metric"]: t for t in table if t["layer"] == "baseline"}
    config = by_metric.get("config_lookup")
    lines = [f"Early warning, {sweep_run} ({counts['positive']} runs reaching val acc {HALF}, {counts['negative']} "
             f"never (at chance at the budget), {counts['censored']} censored; everything fitted leaving one cell "
             f"out; 95% intervals; earlywarning.csv): C{PRIMARY} = concordance within (op, cell) of a measure's "
             f"value {PRIMARY} steps after memorisation with the time to grokking; 0.5 is what the configuration "
             "alone gives."]
    if config:
        lines.append(f"Baseline that reads no measurement, {config['measure']} (alarm at memorisation when most "
                     f"other seeds of the cell grokked): J {interval(config['J'], config['J_lo'], config['J_hi'])} "
                     f"(hits {config['hits']}/{config['positives']}, false alarms {config['false_alarms']}/"
                     f"{config['negatives']}); C{PRIMARY} 0.5 by construction.")
    predictors = [t for t in table if t["role"] == "predictor" and _finite(t[f"c_{PRIMARY}"])]
    beyond = [t["measure"] for t in predictors if _finite(t[f"c_{PRIMARY}_lo"]) and t[f"c_{PRIMARY}_lo"] > 0.5]
    better = [t["measure"] for t in predictors if config and _finite(config["J"]) and any(
        _finite(t.get(k)) and t[k] > config["J"] for k in ("J_lo", "J_lo_value"))]
    lines.append(f"Beyond the configuration: predictors (read no validation labels) with C{PRIMARY}'s interval above "
                 f"0.5: {_names(beyond)}; with J's interval (noise units or value) above the config lookup's J: "
                 f"{_names(better)}.")
    family = next(iter(FAMILIES))
    clock_of = {c["measure"]: c["verdict"] for c in clock if c["family"] == family and c["verdict"]}
    if predictors:
        lines.append("Best predictors: " + "; ".join(
            rule_text(t) + (f"; its onset in the clock test: {clock_of[t['measure']]}" if t["measure"] in clock_of
                            else "") for t in predictors[:3]) + ".")
    references = [t for t in table if t["role"] == "reference" and _finite(t[f"c_{PRIMARY}"])][:2]
    chance = by_metric.get("val_acc_3x_chance")
    if references:
        lines.append("References (read validation labels: not predictors): " + "; ".join(
            rule_text(t) for t in references) + (f"; beside the trivial {rule_text(chance)}" if chance else "") + ".")
    verdicts = {v: sorted({c["measure"] for c in clock if c["verdict"] == v and c["family"] == family})
                for v in ("coupled", "clock")}
    if any(verdicts.values()):
        lines.append(f"Clock test ({family}; clock.csv): onsets that move with val accuracy's (slope's interval above "
                     f"0): {', '.join(verdicts['coupled'][:8]) or 'none'}; clocks (interval below 1, not above 0): "
                     f"{', '.join(verdicts['clock'][:8]) or 'none'}.")
    return lines


