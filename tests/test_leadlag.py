"""Lead-lag arithmetic on synthetic curves whose leads are known."""
import numpy as np
import pytest

from lab import analysis as A


def sigmoid(steps, centre, width=150.0):
    return 1 / (1 + np.exp(-(steps - centre) / width))


def test_completion_steps_of_a_known_sigmoid_and_robustness_to_spikes():
    steps = np.arange(0, 6000, 10.0)
    values = 0.02 + 0.98 * sigmoid(steps, 3000)
    (t10, t50, t90), _, _ = A.completion(steps, values, start=400)
    assert t50 == pytest.approx(3000, abs=10)
    assert t10 == pytest.approx(3000 - 150 * np.log(9), abs=15) and t90 == pytest.approx(3000 + 150 * np.log(9), abs=15)
    spiky = values.copy()
    spiky[(steps > 1500) & (steps < 1540)] = 0.95  # a 40-step spike up before the jump
    spiky[(steps > 4500) & (steps < 4530)] = 0.05  # and one down after it, as val accuracy shows
    assert A.completion(steps, spiky, start=400)[0][1] == pytest.approx(3000, abs=10)
    falling = 5 - 4 * sigmoid(steps, 2000)  # a measure that decreases completes its change the same way
    assert A.completion(steps, falling, start=400)[0][1] == pytest.approx(2000, abs=10)


def test_a_measure_that_does_not_change_says_so():
    rng = np.random.RandomState(0)
    steps = np.arange(0, 6000, 100.0)
    assert A.completion(steps, 0.3 + 0.01 * rng.randn(len(steps)), start=400) is None  # noise only
    bump = 0.3 + sigmoid(steps, 2000) - sigmoid(steps, 3500)  # goes and comes back: no net change
    assert A.completion(steps, bump, start=400) is None
    assert A.completion(steps, np.full(len(steps), 2.0), start=400) is None


def pair(seed, centre, memorised=400, steps=6000):
    log_steps = np.arange(10, steps + 1, 10)
    val = 0.01 + 0.99 * sigmoid(log_steps, centre, 100)
    log = [{"step": int(s), "train_acc": 1.0 if s >= memorised else 0.5, "val_acc": float(v),
            "train_loss": 0.01, "val_loss": float(5 - 5 * v)} for s, v in zip(log_steps, val)]
    grok = next((int(s) for s, v in zip(log_steps, val) if v > 0.99), None)
    return A.Pair("run_0", "x_plus_y", seed, "", log, {"step_val_acc_99": grok or steps, "grokked": grok is not None})


def test_leads_over_validation_accuracy_are_recovered_across_seeds():
    pairs = [pair(0, 2500), pair(1, 3000), pair(2, 3500), pair(3, 9000)]  # seed 3 never groks
    leads = {"early": 400, "late": -300}  # steps by which each measure's jump precedes val accuracy's
    rows = []
    for p in pairs:
        centre = {0: 2500, 1: 3000, 2: 3500, 3: 9000}[p.seed]
        for name, lead in leads.items():
            for step in range(0, 6001, 100):
                rows.append({"run": "run_0", "op": "x_plus_y", "seed": p.seed, "layer": "last", "split": "val",
                             "metric": name, "step": step, "value": float(sigmoid(step, centre - lead))})
    found, left_out = A.leadlag_rows(pairs, rows)
    assert left_out == [3]
    for name, lead in leads.items():
        mine = [r for r in found if r["measure"] == name]
        assert len(mine) == 3 and all(r["lead"] == pytest.approx(lead, abs=25) for r in mine)
    table = {t["measure"]: t for t in A.leadlag_table(found) if t["layer"] == "last"}
    assert table["early"]["leads"] == 3 and table["late"]["lags"] == 3
    assert table["early"]["lead_mean"] == pytest.approx(400, abs=25) and table["early"]["lead_stderr"] < 20
    sentence = A.describe_leaders(A.leadlag_table(found))
    assert "early (last, val)" in sentence.split("lagging")[0] and "late (last, val)" in sentence.split("lagging")[1]
