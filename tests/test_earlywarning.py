"""The early-warning and onset statistics on synthetic runs whose answers are known (lab.stats, lab.onset,
lab.earlywarning): each test names the mistake it exists to catch."""
import math

import numpy as np
import pytest

from lab import earlywarning as W
from lab import onset, stats
from lab.analysis import TrainedJob, measure_label
from lab.schema import LAYERS, LOG_MEASURES, METRIC_SPLITS, MODEL_MEASURES, READS, reads

MEM = 200
STEP = 100
JUMP = 1e4  # a jump far beyond every alarm level (LEVELS) in band half-widths of the tests' noise


def noisy(rng, n, scale=0.01):
    """Uniform noise in [-scale, scale] whose extremes both fall in the post-memorisation band (the first two
    measurements), so that noise alone never leaves the band: the tests' onsets are their jumps'."""
    noise = rng.uniform(-scale, scale, n)
    noise[:2] = -scale, scale
    return noise


def make_run(rng, op="x_plus_y", cell="a", seed=0, t50=None, budget=4000, rising=False, measures=None,
             config=None, chance=0.1):
    """A WarnRun memorised at MEM, measured every STEP steps to MEM + budget. Val accuracy sits at chance with
    noise and jumps to 1 at MEM + t50 (None: never); grokking (0.99) comes 100 steps after. measures: name ->
    function(steps since memorisation) -> values, noise added."""
    grid = np.arange(MEM, MEM + budget + 1, STEP, dtype=float)
    since = grid - MEM
    val = chance + noisy(rng, len(grid), 0.005)
    if t50 is not None:
        val = np.where(since >= t50, 1.0, val)
    if rising:
        val = val + np.linspace(0, 0.3, len(grid))
    series = {("log", "val", "acc"): val}
    for name, f in (measures or {}).items():
        series[("model", "all", name)] = f(since) + noisy(rng, len(grid))
    half = None if t50 is None else MEM + t50
    return W.WarnRun(op, cell, seed, MEM, half, None if half is None else half + 100, int(grid[-1]), grid, series,
                     rising, chance, config or {})


# ----------------------------------------------------------------------------- lab.stats
def test_wilson_interval_matches_the_published_value():
    low, high = stats.wilson(6, 7)  # the 6/7 hits: [0.49, 0.97]
    assert (round(low, 2), round(high, 2)) == (0.49, 0.97)
    assert stats.wilson(0, 10)[0] == 0 and stats.wilson(10, 10)[1] == pytest.approx(1)
    assert all(math.isnan(x) for x in stats.wilson(0, 0))


def test_kaplan_meier_median_on_published_and_hand_counted_samples():
    # Freireich et al.'s 6-MP arm (21 remission times in weeks, + censored): the textbook KM median is 23 weeks,
    # survival 0.857 after week 6 (3 of 21), 0.448 after week 23
    weeks = "6 6 6 6+ 7 9+ 10 10+ 11+ 13 16 17+ 19+ 20+ 22 23 25+ 32+ 32+ 34+ 35+".split()
    times, events = [float(w.rstrip("+")) for w in weeks], [not w.endswith("+") for w in weeks]
    steps, survival = stats.kaplan_meier(times, events)
    assert steps[0] == 6 and survival[0] == pytest.approx(18 / 21)
    assert survival[list(steps).index(23)] == pytest.approx(0.448, abs=5e-4)
    assert stats.km_median(times, events) == 23
    # hand-counted: the run censored at 2 leaves 3 at risk at 3 (S 0.8 * 2/3 = 0.53), 2 at 4 (0.27): median 4
    assert stats.km_median([1, 2, 3, 4, 5], [True, False, True, True, True]) == 4
    assert stats.km_median([1, 2, 3, 4, 5], [True] * 5) == 3  # no censoring: the sample median
    assert stats.km_median([2, 2, 3, 3], [True] * 4) == 2  # at or below 0.5
    assert stats.km_median([5, 6, 7], [True, False, False]) == math.inf  # S stays 2/3: not reached
    low, high = stats.km_median_interval(times, events)
    assert low <= 23 <= high and high == math.inf  # the resamples that lose the late events never reach 0.5
    low, high = stats.km_median_interval([1, 2, 3, 4, 5, 6, 7, 8, 9], [True] * 9)
    assert 1 <= low <= 5 <= high <= 9


def test_ratio_of_kaplan_meier_medians_with_censored_arms():
    assert stats.km_ratio_interval([40, 40, 40], [True] * 3, [10, 10, 10], [True] * 3) == (4.0, 4.0, 4.0)
    ratio, low, high = stats.km_ratio_interval([50] * 3, [False] * 3, [10, 20, 30], [True] * 3)
    assert ratio == math.inf and high == math.inf  # the slow arm never got there: an unbounded speed-up
    ratio, low, high = stats.km_ratio_interval([1, 2, 3, 4, 5], [True] * 5, [1] * 5, [True] * 5)
    assert ratio == 3 and 1 <= low <= 3 <= high <= 5
    assert math.isnan(stats.km_ratio_interval([5, 6], [True] * 2, [9, 9], [False] * 2)[0])  # no median below


def test_concordance_with_censoring_on_a_hand_counted_example():
    # times 1, 2, 3, 4; the run at 2 is censored: it forms a pair only with the run at 1 (which had its event).
    times, events = [1, 2, 3, 4], [True, False, True, True]
    comparable = 5  # (1,2) (1,3) (1,4) (3,4), and not (2, *): censored first
    assert stats.concordance_counts(times, events, [4, 3, 2, 1]) == (4.0, 4.0)
    assert stats.concordance_counts(times, events, [1, 2, 3, 4]) == (0.0, 4.0)
    assert stats.concordance_counts(times, events, [5, 5, 5, 5]) == (2.0, 4.0)  # ties count half
    # the censored run's score matters only against the run at 1: raising it above 4 costs one concordance
    assert stats.concordance_counts(times, events, [4, 9, 2, 1]) == (3.0, 4.0)
    assert comparable - 1 == stats.concordance_counts(times, events, [4, 3, 2, 1])[1]
    # a censored run later than every event pairs with all of them
    assert stats.concordance_counts([1, 2, 10], [True, True, False], [3, 2, 1]) == (3.0, 3.0)


def test_concordance_pairs_only_within_a_stratum():
    # each stratum perfectly ordered, but stratum b's runs are all later and score higher: pooled unstratified C
    # would be low; stratified C is 1
    a = stats.concordance_counts([1, 2, 3], [True] * 3, [3, 2, 1])
    b = stats.concordance_counts([10, 20, 30], [True] * 3, [30, 20, 10])
    assert stats.concordance([a, b]) == 1.0
    pooled = stats.concordance([stats.concordance_counts([1, 2, 3, 10, 20, 30], [True] * 6, [3, 2, 1, 30, 20, 10])])
    assert pooled < 0.5


def test_bootstrap_is_seeded_and_brackets_the_statistic():
    groups = [np.array([k, 10]) for k in (2, 5, 8, 3, 9, 6)]
    ratio = lambda g: np.sum(g, 0)[0] / np.sum(g, 0)[1]  # noqa: E731
    first, again = stats.bootstrap(groups, ratio), stats.bootstrap(groups, ratio)
    assert first == again and first[0] < ratio(groups) < first[1]
    assert all(math.isnan(x) for x in stats.bootstrap(groups[:1], ratio))


def test_a_bootstrap_interval_is_95_percent_wide():
    """The mean of 400 standard normals: the 95% interval is about +-1.96 / 20 = +-0.098 around it."""
    values = np.random.default_rng(16).standard_normal(400)
    low, high = stats.bootstrap(list(values), np.mean)
    assert 0.16 < high - low < 0.24 and low < values.mean() < high


def test_fixed_effects_slope_removes_each_groups_level():
    x1, x2 = np.array([1.0, 2, 3]), np.array([1.0, 2, 3])
    assert stats.fixed_effects_slope([(x1, 2 * x1), (x2, 2 * x2 + 100)]) == pytest.approx(2)
    assert stats.fixed_effects_slope([(x1, np.full(3, 5.0)), (x2, np.full(3, 50.0))]) == pytest.approx(0)


# ----------------------------------------------------------------------------- lab.onset
def step_series(rng, n=60, at=30, jump=1.0):
    values = 2.0 + noisy(rng, n)
    values[at:] += jump
    return values


@pytest.mark.parametrize("f", [np.exp, lambda v: np.log(v - 1), lambda v: -v, lambda v: v ** 3, lambda v: 1 / v],
                         ids=["exp", "log", "negate", "cube", "reciprocal"])
def test_an_onset_does_not_move_under_a_monotone_rescaling(f):
    rng = np.random.default_rng(3)
    grid = np.arange(0, 6000, 100.0)
    values = step_series(rng)
    found = onset.onset(grid, values)
    assert found is not None and found[0] == grid[30] and found[1] == 1
    rescaled = onset.onset(grid, f(values))
    assert rescaled[0] == found[0]
    assert rescaled[1] == (found[1] if f(3.0) > f(2.0) else -found[1])


def test_an_onset_does_not_move_with_the_budget():
    rng = np.random.default_rng(4)
    grid = np.arange(0, 6000, 100.0)
    values = step_series(rng)
    found = onset.onset(grid, values)
    for cut in (30 + onset.RUN, 40, 60):  # the budget ends just after the onset's run, or later
        assert onset.onset(grid[:cut], values[:cut]) == found
    assert onset.onset(grid[:30 + onset.RUN - 1], values[:30 + onset.RUN - 1]) is None  # the run is not complete


def test_an_onset_needs_a_run_of_measurements_beyond_the_band_on_one_side():
    grid = np.arange(0, 3000, 100.0)
    flat = np.array([0.0, 1.0] * 4 + [0.5] * 22)  # band [0, 1]
    assert onset.band(flat) == (0.0, 1.0) and onset.onset(grid, flat) is None
    touching = flat.copy()
    touching[10:20] = 1.0  # at the band's edge is not beyond it
    assert onset.onset(grid, touching) is None
    short = flat.copy()
    short[10:10 + onset.RUN - 1] = 5.0  # one measurement short of a run
    assert onset.onset(grid, short) is None
    zigzag = flat.copy()
    zigzag[10:20] = [5.0, -5.0] * 5  # beyond the band, but never on one side for a run
    assert onset.onset(grid, zigzag) is None
    below = flat.copy()
    below[12:] = -1.0
    assert onset.onset(grid, below) == (grid[12], -1)


def test_noise_alone_rarely_makes_an_onset():
    """Independent noise, 50 measurements after memorisation: an onset in under 5% of 4000 series (the band and
    run lengths chosen for it: 2.9% expected; with RUN - 1 it would be 8%, with RUN - 2, 23%)."""
    rng = np.random.default_rng(15)
    grid = np.arange(50, dtype=float)
    found = sum(onset.onset(grid, rng.standard_normal(50)) is not None for _ in range(4000))
    assert 0.01 < found / 4000 < 0.05


def test_the_level_one_alarm_is_the_onset_read_when_it_is_known():
    rng = np.random.default_rng(5)
    run = make_run(rng, t50=2500, measures={"drop": lambda s: np.where(s >= 1500, -JUMP, 0.0)})
    key = ("model", "all", "drop")
    step, side = run.onset(key)
    assert (step, side) == (1500, -1)
    assert run.alarm(key, -1, 1) == step + (onset.RUN - 1) * STEP
    assert run.alarm(key, 1, 1) is None
    assert run.alarm(key, -1, 1e9) is None  # the drop is about 1e6 band half-widths, not 1e9


# ----------------------------------------------------------------------------- outcomes
def test_an_alarm_needs_the_deviation_strictly_above_its_level():
    grid = np.arange(MEM, MEM + 3001, STEP, dtype=float)
    values = np.array([0.0, 2.0] * 4 + [3.0] * (len(grid) - 8))  # band [0, 2]: midpoint 1, half-width 1; then z = 2
    run = W.WarnRun("x_plus_y", "a", 0, MEM, None, None, int(grid[-1]), grid, {("model", "all", "m"): values})
    assert run.alarm(("model", "all", "m"), 1, 2) is None
    assert run.alarm(("model", "all", "m"), 1, 1.99) == 800 + (onset.RUN - 1) * STEP


def test_outcomes_positive_negative_censored_and_excluded():
    rng = np.random.default_rng(6)
    horizon = 2000
    assert make_run(rng, t50=1500).status(horizon) == "positive"
    assert make_run(rng, t50=None).status(horizon) == "negative"
    assert make_run(rng, t50=None, rising=True).status(horizon) == "censored"  # on its way up at the budget
    assert make_run(rng, t50=None, budget=1500).status(horizon) == "censored"  # not watched for the horizon
    assert make_run(rng, t50=300).status(horizon) == "excluded"  # val acc 0.5 inside the band
    passed_half = make_run(rng, t50=1500)
    passed_half.grok_step = None  # past 0.5, never 0.99 within the budget: still a positive (it reached 0.5)
    assert passed_half.status(horizon) == "positive"


def test_a_hit_comes_strictly_before_the_half_step_and_a_false_alarm_within_the_horizon():
    rng = np.random.default_rng(7)
    positive, negative = make_run(rng, t50=1500), make_run(rng, t50=None)
    assert W.judge(positive, 1400, 2000) == "hit" and W.judge(positive, 1500, 2000) == "miss"
    assert W.judge(positive, None, 2000) == "miss"
    assert W.judge(negative, 2000, 2000) == "false alarm" and W.judge(negative, 2100, 2000) == "quiet"
    assert W.judge(negative, None, 2000) == "quiet"


# ----------------------------------------------------------------------------- the evaluation, end to end
def sweep(rng, never_after=None, cells="abcd", seeds=4, grokking="ab"):
    """Cells a and b: every seed reaches val acc 0.5 (at 1600 to 2800 steps after memorisation, by seed); cells c
    and d: none does. Measures: `copy` falls 700 steps before val accuracy's 0.5 in positives and stays flat in
    negatives; `clock` falls at 900 steps in every run; `flat` never moves; `late` falls 700 steps before 0.5 in
    the positives and in the negatives after `never_after` steps."""
    runs = []
    for cell in cells:
        for seed in range(seeds):
            t50 = 1600 + 400 * seed if cell in grokking else None
            measures = {"copy": lambda s, t=t50: np.where(s >= (t or 1e9) - 700, -JUMP, 0.0),
                        "clock": lambda s: np.where(s >= 900, -JUMP, 0.0),
                        "flat": lambda s: np.zeros_like(s)}
            if never_after is not None:
                measures["late"] = lambda s, t=t50: np.where(s >= (t - 700 if t else never_after), -JUMP, 0.0)
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000, measures=measures))
    return runs


def rows_by_name(runs):
    return {t["metric"]: t for t in W.earlywarning_table(runs)}


def test_known_answers_copy_clock_flat_and_the_config_lookup():
    rows = rows_by_name(sweep(np.random.default_rng(8)))
    copy, clock, flat, config = rows["copy"], rows["clock"], rows["flat"], rows["config_lookup"]
    assert (copy["hit_rate"], copy["false_alarm_rate"], copy["J"]) == (1.0, 0.0, 1.0)
    assert copy["lead"] == pytest.approx(700 - (onset.RUN - 1) * STEP)  # the alarm is known RUN - 1 steps late
    assert (clock["hit_rate"], clock["false_alarm_rate"], clock["J"]) == (1.0, 1.0, 0.0)
    assert (flat["hit_rate"], flat["false_alarm_rate"], flat["J"]) == (0.0, 0.0, 0.0)
    # cells are all-or-nothing: the config lookup is perfect at alarms, and at chance within cells
    assert (config["J"], config["lead"]) == (1.0, pytest.approx(np.mean([1600, 2000, 2400, 2800])))
    assert config[f"c_{W.PRIMARY}"] == 0.5
    assert rows["fixed_delay"]["J"] <= 0
    # val accuracy jumps from chance to 1 at once here: above 3x chance only after its 0.5, no warning
    chance = rows["val_acc_3x_chance"]
    assert (chance["role"], chance["reads"], chance["hits"], chance["false_alarms"]) == (
        "reference", "val_labels", 0, 0)
    assert (copy["role"], copy["reads"]) == ("reference", "unknown")  # a measure no registry declares
    assert rows["acc"]["role"] == "reference" and rows["acc"]["reads"] == "val_labels"


def test_a_measure_that_copies_the_time_to_grokking_scores_c_1_within_cells():
    rng = np.random.default_rng(9)
    runs = []
    for cell in ("a", "b", "c"):
        for seed in range(5):
            t50 = 1500 + 300 * seed + 1000 * (cell == "b")
            # its value at every offset is minus the run's own time to 0.5: higher, sooner
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000,
                                 measures={"oracle": lambda s, t=t50: np.full_like(s, -float(t)) + 0 * s}))
    runs += [make_run(rng, cell=cell, seed=9, t50=None, budget=5000,
                      measures={"oracle": lambda s: np.full_like(s, -1e4)}) for cell in ("a", "b", "c")]
    rows = rows_by_name(runs)
    for offset in W.OFFSETS:
        assert rows["oracle"][f"c_{offset}"] == pytest.approx(1.0)
    assert rows["config_lookup"][f"c_{W.PRIMARY}"] == 0.5
    # flipped, the held-out direction is fitted on the other cells: it still orders correctly
    for run in runs:
        run.series[("model", "all", "oracle")] = -run.series[("model", "all", "oracle")]
    assert rows_by_name(runs)["oracle"][f"c_{W.PRIMARY}"] == pytest.approx(1.0)


def oracle_cells(rng, signs: dict, offsets: dict = None):
    """Per cell, 5 seeds reaching val acc 0.5 at 1500 + 300 * seed (+ the cell's offset), and a measure equal to
    sign * the time to 0.5 plus the cell's offset (constant in each run)."""
    runs = []
    for cell, sign in signs.items():
        shift = (offsets or {}).get(cell, 0)
        for seed in range(5):
            t50 = 1500 + 300 * seed + shift
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000,
                                 measures={"oracle": lambda s, v=sign * t50 + shift * 10: np.full_like(s, float(v))}))
    return runs


def test_the_concordance_is_stratified_by_cell():
    """Within each cell the measure orders the runs perfectly (higher: sooner); across cells it orders them
    backwards (the later cell scores higher). Stratified, C is 1."""
    runs = oracle_cells(np.random.default_rng(17), {"a": -1, "b": -1, "c": -1}, {"a": 0, "b": 600, "c": 1200})
    assert rows_by_name(runs)["oracle"][f"c_{W.PRIMARY}"] == pytest.approx(1.0)


def test_a_cells_direction_in_the_concordance_comes_from_the_other_cells():
    """In cell a, higher means later; in b, c and d, sooner. Cell a, judged in the other cells' direction, scores 0;
    each of the others, judged in the direction of the majority of the rest, 1: 0.75 pooled (equal pairs)."""
    runs = oracle_cells(np.random.default_rng(18), {"a": 1, "b": -1, "c": -1, "d": -1})
    assert rows_by_name(runs)["oracle"][f"c_{W.PRIMARY}"] == pytest.approx(0.75)


def test_the_config_lookup_reads_the_other_seeds_only():
    """One cell of 3 seeds, 2 reaching val acc 0.5: each positive's peers are 1 of 2 positive (not more than half:
    no alarm), the negative's 2 of 2 (a false alarm). Reading its own outcome, a positive would see 2 of 3."""
    rng = np.random.default_rng(19)
    runs = [make_run(rng, cell="a", seed=s, t50=t, budget=5000) for s, t in enumerate((1500, 1800, None))]
    runs += [make_run(rng, cell="b", seed=s, t50=None, budget=5000) for s in range(3)]
    runs += [make_run(rng, cell="c", seed=s, t50=2000, budget=5000) for s in range(3)]  # sets cell a's horizon
    config = rows_by_name(runs)["config_lookup"]
    assert (config["hits"], config["positives"], config["false_alarms"], config["negatives"]) == (3, 5, 1, 4)


def test_the_concordance_counts_only_runs_not_yet_half_way_at_the_offset():
    rng = np.random.default_rng(10)
    early = make_run(rng, t50=400, budget=5000)
    assert not W.at_risk(early, 500) and W.at_risk(early, 200) and W.at_risk(make_run(rng, t50=None), 5000)


def test_a_false_alarm_counts_only_within_the_horizon():
    """`late` falls in the negatives only after `never_after` steps: inside the horizon (the longest
    memorisation-to-0.5 time of the positives, 2800) it is a false alarm, past it not."""
    inside = rows_by_name(sweep(np.random.default_rng(11), never_after=1500))["late"]
    outside = rows_by_name(sweep(np.random.default_rng(11), never_after=3500))["late"]
    assert inside["false_alarm_rate"] == 1.0 and outside["false_alarm_rate"] == 0.0
    assert inside["hit_rate"] == outside["hit_rate"] == 1.0


class Spy(W.Measure):
    """A measure that records which runs it was fitted on."""

    def __init__(self, key):
        super().__init__(key)
        self.calls = []

    def fit(self, train, window):
        self.calls.append({(r.op, r.cell, r.seed) for r in train})
        return super().fit(train, window)


def test_a_cells_own_seeds_never_set_its_thresholds():
    runs = sweep(np.random.default_rng(12))
    for r in runs[::2]:
        r.op = "x_minus_y"
    spy = Spy(("model", "all", "copy"))
    judged = W.held_out(spy, runs, "cell")
    assert len(spy.calls) == 4 and len(judged) == len(runs)
    for (train, held), seen in zip(W.folds(runs, "cell"), spy.calls):
        assert seen == {(r.op, r.cell, r.seed) for r in train}
        assert not seen & {(r.op, r.cell, r.seed) for r in held}
        assert {r.cell for r in held} == {held[0].cell} and held[0].cell not in {c for _, c, _ in seen}
    spy.calls.clear()
    W.held_out(spy, runs, "op")
    assert [{op for op, _, _ in seen} for seen in spy.calls] == [{"x_plus_y"}, {"x_minus_y"}]


def test_leave_one_cell_out_changes_the_answer_when_a_cell_is_its_own_kind():
    """In cell a alone the measure rises before grokking; in cell b (the only other cell with positives) it
    falls. Fitted on the other cells, each cell is judged in the wrong direction: no hits. Fitted on everything,
    the same rule would hit in one of them."""
    rng = np.random.default_rng(13)
    runs = []
    for cell, sign in (("a", 1.0), ("b", -1.0), ("c", 0.0), ("d", 0.0)):
        for seed in range(4):
            t50 = 1800 + 200 * seed if sign else None
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000,
                                 measures={"own": lambda s, t=t50, g=sign: np.where(s >= (t or 1e9) - 700, g * JUMP,
                                                                                   0.0)}))
    held = W.score_rule(W.Measure(("model", "all", "own")), runs)
    assert held["hit_rate"] == 0.0
    rule = W.Measure(("model", "all", "own"))
    fitted = rule.fit(runs, W.horizon(runs))
    in_sample = [W.judge(r, rule.alarm(r, fitted, []), W.horizon(runs)) for r in runs]
    assert in_sample.count("hit") == 4


# ----------------------------------------------------------------------------- the clock test
def clock_runs(rng):
    """Two groups of cells (lr*wd 0.002 and 0.004), three train fractions each; val accuracy's onset moves with
    the train fraction; `follows` leaves 300 steps before it; `clock` leaves at 3 / (lr*wd) steps whatever the
    train fraction."""
    runs = []
    for wd in (1.0, 2.0):
        for tf in (0.3, 0.4, 0.5):
            for seed in range(4):
                t50 = int(1300 + 4000 * (0.5 - tf) / wd + 100 * seed)
                clock_at = 3 / (0.002 * wd)
                measures = {"follows": lambda s, t=t50: np.where(s >= t - 300, -JUMP, 0.0),
                            "clock": lambda s, c=clock_at: np.where(s >= c, -JUMP, 0.0)}
                runs.append(make_run(rng, cell=f"tf{tf}_wd{wd}", seed=seed, t50=t50, budget=5000, measures=measures,
                                     config={"train_frac": tf, "weight_decay": wd, "lr": 0.002}))
    return runs


def test_the_clock_slope_tells_a_coupled_measure_from_a_clock():
    rows = {(c["metric"], c["family"]): c for c in W.clock_table(clock_runs(np.random.default_rng(14)))}
    data = next(iter(W.FAMILIES))
    follows, clock = rows[("follows", data)], rows[("clock", data)]
    assert follows["slope"] == pytest.approx(1, abs=0.05) and follows["verdict"] == "coupled"
    assert clock["slope"] == pytest.approx(0, abs=0.05) and clock["verdict"] == "clock"
    assert follows["cells"] == 6 and follows["runs"] == 24
    assert follows["onset_lead"] == pytest.approx(300) and follows["leads"] == 24
    assert rows[("acc", data)]["slope"] == pytest.approx(1)  # val accuracy against itself


def test_a_threshold_on_the_value_where_noise_units_fail():
    """In the runs that grok the measure climbs from memorisation on (a wide band); in the others it sits flat and
    twitches by 0.05 at step 2000, far outside its narrow band. In noise units no level both warns and stays
    quiet; on the value, a threshold does (J 1)."""
    rng = np.random.default_rng(21)
    runs = []
    for cell in "abcdef":
        for seed in range(4):
            t50 = 1600 + 400 * seed if cell in "abe" else None
            climb = (lambda s: s / 1000.0) if t50 else (lambda s: np.where((s >= 2000) & (s < 2600), 0.05, 0.0))
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000, measures={"climb": climb}))
    row = rows_by_name(runs)["climb"]
    assert row["J_value"] == 1.0 and row["J"] < 0.5


def test_the_clock_verdicts():
    assert W.verdict(0.2, 1.4) == "coupled" and W.verdict(-0.3, 0.6) == "clock"
    assert W.verdict(-2.0, -0.5) == "opposite" and W.verdict(-0.5, 1.5) == "unclear"


def test_a_measure_only_some_runs_have_is_judged_on_those_runs_only():
    """RQI exists for x+y only: x-y's runs are neither misses nor quiet runs for it."""
    runs = sweep(np.random.default_rng(20), cells="abcdef", grokking="abe")
    for r in runs:
        if r.cell in ("b", "d"):
            del r.series[("model", "all", "copy")]
    copy = rows_by_name(runs)["copy"]
    assert (copy["positives"], copy["negatives"], copy["J"]) == (8, 8, 1.0)


# ----------------------------------------------------------------------------- what each measure reads
def test_every_registered_measure_declares_what_it_reads():
    keys = [(layer, split, metric) for layer in LAYERS for metric, splits in METRIC_SPLITS.items() for split in splits]
    keys += [("model", "all", m) for m in MODEL_MEASURES] + [("log", s, m) for s, m, _ in LOG_MEASURES]
    for key in keys:
        assert reads(*key) in READS and reads(*key) != "unknown", measure_label(*key)
    assert reads("last", "val", "knn_acc") == reads("last", "val", "ncc_acc") == "val_labels"
    assert reads("log", "val", "loss") == "val_labels" and reads("model", "all", "restricted_loss") == "val_labels"
    assert reads("last", "train", "silhouette") == "train" and reads("model", "all", "param_norm") == "weights"
    assert reads("last", "all", "participation_ratio") == "inputs"
    assert reads("last", "all", "within_class_var") == "val_labels"  # labels of every pair, val included
    assert reads("model", "all", "a_plugins_own") == "unknown" and W.role("unknown") == "reference"
    assert W.role("val_labels") == "reference" and W.role("weights") == "predictor"


def test_a_job_read_from_its_log_is_censored_only_when_it_ends_above_3x_chance():
    """warn_run on a job's log: val accuracy that never reaches 0.5 but ends at 0.2 (above 3 / 31) is rising, one
    that dips after memorisation and ends at 0.05 (above chance, 1 / 31, and its post-memorisation band) is not."""
    def job(final):
        log = [{"step": s, "train_acc": 1.0 if s >= 300 else 0.5, "train_loss": 0.01, "val_loss": 4.0,
                "val_acc": 0.03 if s < 300 else 0.003 if s < 1000 else final} for s in range(10, 5001, 10)]
        return TrainedJob("run_0", "x_minus_y", 0, "", log, {"step_val_acc_99": 5000, "grokked": False})

    wandering, rising = (W.warn_run(job(final), "a", {}, chance=1 / 31) for final in (0.05, 0.2))
    assert not wandering.rising and rising.rising and wandering.half_step is None
    assert wandering.memorisation_step == wandering.grid[0] == 300 and wandering.grid[1] - wandering.grid[0] == 100
    assert wandering.status(2000) == "negative" and rising.status(2000) == "censored"



def test_the_notes_give_each_best_predictor_its_clock_verdict():
    """An agent reads the notes block, not clock.csv: a predictor ranked there carries its clock-test verdict."""
    runs = clock_runs(np.random.default_rng(14))
    table = W.earlywarning_table(runs)
    for t in table:
        if t["metric"] in ("follows", "clock"):
            t["role"] = "predictor"  # synthetic measures declare no reads
    line = next(x for x in W.notes("s", table, W.clock_table(runs), W.tally(runs)) if x.startswith("Best predictors"))
    parts = line[len("Best predictors: "):].split("; its onset in the clock test: ")
    verdicts = {p.split(" (reads")[0].split("; ")[-1]: n.split(";")[0].rstrip(".") for p, n in zip(parts, parts[1:])}
    assert verdicts == {"follows (model, all)": "coupled", "clock (model, all)": "clock"}
