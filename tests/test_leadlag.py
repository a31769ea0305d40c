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


def wiggle(step):
    """Deterministic noise: +-0.004 in alternate 100-step blocks. Its extremes fall in every band, so noise alone
    never makes an onset (lab.onset): the onsets here are the jumps'."""
    return 0.004 if (int(step) // 100) % 2 else -0.004


def pair(seed, centre, memorised=400, steps=6000):
    log_steps = np.arange(10, steps + 1, 10)
    val = 0.01 + 0.99 * sigmoid(log_steps, centre, 100) + np.array([wiggle(s) for s in log_steps])
    log = [{"step": int(s), "train_acc": 1.0 if s >= memorised else 0.5, "val_acc": float(v),
            "train_loss": 0.01, "val_loss": float(5 - 5 * v)} for s, v in zip(log_steps, val)]
    grok = next((int(s) for s, v in zip(log_steps, val) if v > 0.99), None)
    final = {"step_val_acc_99": grok or steps, "grokked": grok is not None}
    return A.TrainedJob("run_0", "x_plus_y", seed, "", log, final)


CENTRES = {0: 2500, 1: 3000, 2: 3500, 3: 9000}  # seed 3 never groks


def measure_rows(pairs, leads, transform=lambda v: v, last=6000):
    """Rows of measures that jump `lead` steps before val accuracy (the same shape, width 100), every 100 steps."""
    rows = []
    for p in pairs:
        for name, lead in leads.items():
            for step in range(0, last + 1, 100):
                value = 1 + 0.99 * sigmoid(step, CENTRES[p.seed] - lead, 100) + wiggle(step)
                rows.append({"run": "run_0", "op": "x_plus_y", "seed": p.seed, "layer": "last", "split": "val",
                             "metric": name, "step": step, "value": float(transform(value))})
    return rows


def test_leads_over_validation_accuracy_are_recovered_across_seeds():
    pairs = [pair(seed, centre) for seed, centre in CENTRES.items()]
    leads = {"early": 400, "late": -300}  # steps by which each measure's jump precedes val accuracy's
    found, left_out = A.leadlag_rows(pairs, measure_rows(pairs, leads))
    assert left_out == [3]
    for name, lead in leads.items():
        mine = [r for r in found if r["measure"] == name]
        # onsets fall on the 100-step grid, and the wiggle can hold a jump's start back one 100-step block
        assert len(mine) == 3 and all(r["onset_lead"] == pytest.approx(lead, abs=200) for r in mine)
        assert all(r["t50_lead"] == pytest.approx(lead, abs=25) for r in mine)
        assert all(r["reads"] == "unknown" for r in mine)  # a metric no registry declares
    table = {t["measure"]: t for t in A.leadlag_table(found) if t["layer"] == "last"}
    assert table["early"]["leads"] == 3 and table["late"]["lags"] == 3
    early = table["early"]
    assert early["lead_mean"] == pytest.approx(400, abs=100) and early["lead_lo"] <= early["lead_mean"] <= early[
        "lead_hi"]
    assert early["lead_lo"] > 0 and table["late"]["lead_hi"] < 0
    sentence = A.describe_leaders(A.leadlag_table(found))
    before, after = sentence.split("after it")
    assert "early (last, val) [reads: undeclared]" in before and "late (last, val)" in after


def test_a_leader_is_named_by_its_interval_not_its_mean():
    row = {"layer": "last", "split": "train", "seeds": 3, "n": 3, "leads": 2, "lags": 1, "reads": "train"}
    table = [{**row, "measure": "sure", "lead_mean": 300.0, "lead_lo": 100.0, "lead_hi": 500.0},
             {**row, "measure": "unsure", "lead_mean": 300.0, "lead_lo": -200.0, "lead_hi": 700.0}]
    sentence = A.describe_leaders(table)
    assert "sure (last, train) by 300 [100, 500]" in sentence and "unsure" not in sentence


def test_onset_leads_do_not_move_with_a_rescaling_or_the_budget_and_t50_leads_do():
    """The reason leads are read at onsets: a log of the measure, or a budget that ends at step 4000 instead of
    6000, leaves every onset where it was, while the t50 moves (half of a log's change is not half of the
    change; half of the change to step 4000 is not half of the change to 6000)."""
    pairs = [pair(seed, CENTRES[seed]) for seed in (0, 1)]
    leads = {"early": 400}
    base = {r["seed"]: r for r in A.leadlag_rows(pairs, measure_rows(pairs, leads))[0] if r["measure"] == "early"}
    logged = {r["seed"]: r for r in A.leadlag_rows(pairs, measure_rows(pairs, leads, np.log))[0]
              if r["measure"] == "early"}
    short_pairs = [pair(seed, CENTRES[seed], steps=4000) for seed in (0, 1)]
    short = {r["seed"]: r for r in A.leadlag_rows(short_pairs, measure_rows(short_pairs, leads, last=4000))[0]
             if r["measure"] == "early"}
    for seed in (0, 1):
        assert logged[seed]["onset"] == short[seed]["onset"] == base[seed]["onset"]
        assert logged[seed]["onset_lead"] == short[seed]["onset_lead"] == base[seed]["onset_lead"]
    # a measure on a log scale: t50 moves, and with it the t50 lead
    assert abs(logged[0]["t50"] - base[0]["t50"]) > 20


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
        assert found["spiky"][measure]["t50_lead"] == pytest.approx(lead, abs=25)
        assert found["spiky"][measure]["t50"] == pytest.approx(found["clean"][measure]["t50"], abs=10)


def test_a_seed_half_way_inside_its_band_gets_no_onset_leads():
    """Memorised at 400, its band ends 8 measurements later (1100): a seed half-way at 700 is timed by nothing; one
    half-way at 3000 keeps its leads. Both keep their rows and onsets."""
    inside, after = pair(0, 700), pair(1, CENTRES[1])
    found, left_out = A.leadlag_rows([inside, after], measure_rows([inside, after], {"early": 400}))
    by_seed = {s: [r for r in found if r["seed"] == s] for s in (0, 1)}
    assert left_out == [] and by_seed[0] and by_seed[1]
    assert all(r["onset_lead"] is None and r["half_step"] <= r["band_end"] == 1100 for r in by_seed[0])
    assert [r["onset"] is not None for r in by_seed[0] if r["measure"] == "early"] == [True]
    assert [r["onset_lead"] for r in by_seed[1] if r["measure"] == "early"] == [pytest.approx(400, abs=200)]
    assert A.half_inside_band(1100, 1100) and not A.half_inside_band(1110, 1100) and not A.half_inside_band(None, 1)
