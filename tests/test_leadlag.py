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


def test_a_seed_that_ends_inside_a_spike_is_read_up_to_the_spike():
    """The running median cannot remove a spike at the end of a curve (its window there is one-sided): a seed whose
    last evaluations are inside a spike is read up to the evaluation before it, so its leads are those of the same
    seed without the spike."""
    clean, spiky = pair(0, 2500), pair(0, 2500)
    for r in spiky.log:
        if r["step"] >= 5950:  # the last 6 evaluations: a spike, as small configs show every few hundred steps
            r.update(train_acc=0.4, val_acc=0.3, val_loss=3.5)
    assert A.end_state(spiky)["ends_in_spike"] and A.leadlag_end(spiky) == 5940 and A.leadlag_end(clean) is None
    leads = {"early": 400, "late": -300}
    found = {}
    for name, p in (("clean", clean), ("spiky", spiky)):
        rows = []
        for measure, lead in leads.items():
            for step in range(0, 6001, 100):
                value = float(sigmoid(step, 2500 - lead)) if not (name == "spiky" and step == 6000) else 0.0
                rows.append({"run": "run_0", "op": "x_plus_y", "seed": 0, "layer": "last", "split": "val",
                             "metric": measure, "step": step, "value": value})
        found[name] = {r["measure"]: r for r in A.leadlag_rows([p], rows)[0] if r["layer"] == "last"}
    for measure, lead in leads.items():
        assert found["spiky"][measure]["lead"] == pytest.approx(lead, abs=25)
        assert found["spiky"][measure]["t50"] == pytest.approx(found["clean"][measure]["t50"], abs=10)
