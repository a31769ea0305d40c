"""The reproduction table's arithmetic (tests/reproduce.py): steps to an event with censoring, Kaplan-Meier cells,
and the verdicts, on made-up runs with known answers. The runs themselves are a benchmark, not a test."""
import csv
import math
from types import SimpleNamespace

import reproduce as R


def job(curve: list) -> SimpleNamespace:
    """A finished job whose log has val accuracies `curve` at steps 100, 200, ..."""
    return SimpleNamespace(log=[{"step": 100 * (i + 1), "val_acc": v} for i, v in enumerate(curve)])


def test_event_times_censor_a_run_at_its_last_step():
    runs = [job([0.1, 0.5, 0.96, 0.99]), job([0.1, 0.2, 0.3, 0.4, 0.5]), job([0.95, 0.97])]
    assert R.event_times(runs, 0.95) == ([300, 500, 200], [True, False, True])  # 0.95 itself is not above


def test_kaplan_meier_cell_on_a_made_up_censored_sample():
    # times 100..500, the run at 200 censored: S 0.8 after 100, 0.8 * 2/3 = 0.53 after 300, 0.27 after 400
    median, low, high, text = R.km_cell([100, 200, 300, 400, 500], [True, False, True, True, True])
    assert median == 400 and low <= 400 <= high and text.startswith("400 [") and text.endswith("(4/5 reached)")
    median, _, high, text = R.km_cell([700, 800, 900], [True, False, False])
    assert median == math.inf and high == math.inf and text.startswith("not reached")


def test_verdicts():
    assert R.verdict(910, 1220, 900, 3670) == "reproduces"  # the paper's value inside our interval
    assert R.verdict(910, 2000, 1500, 2500) == "within 3x (above)"
    assert R.verdict(9400, 6111, 5000, 7000) == "within 2x (below)"
    assert R.verdict(910, 10_000, 9000, 11_000) == "does not: 11.0x above the paper's"
    assert R.verdict(39_890, math.inf, 20_000, math.inf, budget=50_000) == "does not: not reached by 50,000"
    assert R.verdict(60_000, math.inf, math.inf, math.inf, budget=50_000).startswith("not measured: the budget")
    assert R.verdict(910, math.nan, math.nan, math.nan) == "not measured: no finished runs"
    assert R.verdict(43.8, 50.0, math.nan, math.nan) == "within 2x (above)"  # one run a side: no interval
    assert R.claim(True, "3/3") == "reproduces: 3/3" and R.claim(None, "no runs") == "not measured: no runs"


def test_with_no_runs_every_headline_is_in_the_table_as_not_measured(tmp_path):
    R.report(str(tmp_path / "no_runs"), str(tmp_path / "figures"))
    with open(tmp_path / "figures" / "reproduction.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["preset"] for r in rows} == {"nanda2023", "grokfast2024", "power2022", "prieto2025"}
    assert len(rows) == 2 + 5 + 2 + 5  # phases and the wd-0 control; 3 arms, 2 speed-ups; 2 ops; 5 arms
    assert all(r["verdict"].startswith("not measured: no finished runs (python tests/reproduce.py run ") for r in rows)
    assert not list((tmp_path / "figures").glob("*.png"))  # no figure without runs
