"""The progress measures: each metric against a known answer or sklearn, Nanda et al.'s measures on logits built
from known frequencies, the measurement schedule, and the saved model."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import experiment as E
from lab import measures as M
from lab import ops
from lab.plugins import ProgressMeasures
from lab.job import load_model
from conftest import TINY, read_json, run_script


def clustered(n_classes=13, per_class=40, d=16, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = (torch.randn(n_classes, d, generator=g) * 3)[y] + spread * torch.randn(len(y), d, generator=g)
    return x, y


def test_silhouette_davies_bouldin_calinski_harabasz_match_sklearn():
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    for spread in (0.3, 3.0):
        x, y = clustered(spread=spread)
        y[:3] = 12  # uneven classes
        y[-1] = 13  # and a lone member, which scores 0
        xn, yn = x.double().numpy(), y.numpy()
        assert M.silhouette(x, y) == pytest.approx(silhouette_score(xn, yn), abs=1e-5)
        assert M.davies_bouldin(x, y) == pytest.approx(davies_bouldin_score(xn, yn), rel=1e-5)
        assert M.scatter_metrics(x, y)["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(xn, yn), rel=1e-5)


def test_knn_and_nearest_centroid_accuracy_match_sklearn():
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    x, y = clustered(spread=2.5)
    is_train = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) < 0.5
    samples = M.metric_samples(is_train, 0, knn_queries=10_000)  # every val row
    found = {(m, s): v for m, s, v in M.representation_metrics(x, y, is_train, samples)}
    xt, yt, xv, yv = x[is_train].numpy(), y[is_train].numpy(), x[~is_train].numpy(), y[~is_train].numpy()
    knn = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(xt, yt)
    assert found[("knn_acc", "val")] == pytest.approx((knn.predict(xv) == yv).mean())
    assert found[("ncc_acc", "val")] == pytest.approx((NearestCentroid().fit(xt, yt).predict(xv) == yv).mean())
    assert 0.3 < found[("knn_acc", "val")] < 0.99  # the case is not trivial


def test_nc1_within_class_variance_and_participation_ratio_on_known_geometry():
    tight, y = clustered(spread=0.01)
    loose, _ = clustered(spread=3.0)
    assert M.scatter_metrics(tight, y)["nc1"] < 1e-3 < M.scatter_metrics(loose, y)["nc1"]
    assert M.within_class_var(tight, y) < 1e-4 < 0.2 < M.within_class_var(loose, y) < 1
    g = torch.Generator().manual_seed(0)
    assert M.within_class_var(torch.randn(2000, 8, generator=g), torch.randint(0, 4, (2000,), generator=g)) > 0.98
    assert M.participation_ratio(torch.randn(4000, 10, generator=g)) == pytest.approx(10, rel=0.1)
    line = torch.outer(torch.randn(500, generator=g), torch.randn(10, generator=g))
    assert M.participation_ratio(line + 1e-6 * torch.randn(500, 10, generator=g)) < 1.1


def test_primitive_root_and_cyclic_coordinates_put_every_cyclic_op_on_a_group():
    assert ops.primitive_root(97) == 5 and ops.primitive_root(11) == 2 and ops.primitive_root(7) == 3
    for op, m in (("x_plus_y", 11), ("x_minus_y", 11), ("x_div_y", 10)):
        task = E.make_task(op, 11)
        rows, i, j, size, sign, residues = ops.cyclic_coordinates(task, E.OPS[op])
        assert size == m and len(rows) == m * m
        assert torch.equal(residues[(i + sign * j) % m], task.y[rows])  # the answer is i + sign * j on Z_m
    assert ops.cyclic_coordinates(E.make_task("permutation", perm_k=3), E.OPS["permutation"]) is None


def fourier_logits(op, p, freqs, scale=4.0):
    """Logits of a model that is the Fourier algorithm: sum_k scale * cos(w_k (i + sign j - t(c)))."""
    task = E.make_task(op, p)
    rows, i, j, m, sign, residues = ops.cyclic_coordinates(task, E.OPS[op])
    coordinate = torch.full((p,), -1)
    coordinate[residues] = torch.arange(m)
    logits = torch.full((len(rows), p), -30.0)  # class 0 of x_div_y has no logarithm: never the answer here
    for c in range(p):
        if coordinate[c] >= 0:
            logits[:, c] = sum(scale * torch.cos(2 * math.pi * k * (i + sign * j - coordinate[c]) / m) for k in freqs)
    return task, rows, M.FourierBasis(i, j, m, sign), logits


@pytest.mark.parametrize("op", ["x_plus_y", "x_minus_y", "x_div_y"])
def test_restricted_and_excluded_loss_of_a_model_that_is_the_fourier_algorithm(op):
    p = 23
    task, rows, basis, logits = fourier_logits(op, p, freqs=(2, 5, 7))
    y = task.y[rows]
    is_train = torch.rand(len(rows), generator=torch.Generator().manual_seed(0)) < 0.5
    found = M.fourier_progress(logits, y, is_train, basis, 3, E.LOSSES["cross_entropy"])
    full = F.cross_entropy(logits, y).item()
    assert sorted(found["key_freqs"]) == [2, 5, 7]
    assert found["logit_key_frac"] == pytest.approx(1.0, abs=1e-4)
    assert found["restricted_loss"] == pytest.approx(full, abs=1e-3) and full < 0.1
    assert found["excluded_loss"] > math.log(p) - 0.1  # nothing but the answer structure: chance or worse
    # A model that memorised (random logits, the answer boosted on the training pairs only) is not Fourier.
    memorised = torch.randn(len(rows), p, generator=torch.Generator().manual_seed(1))
    memorised[is_train, y[is_train]] += 10
    found = M.fourier_progress(memorised, y, is_train, basis, 3, E.LOSSES["cross_entropy"])
    assert found["logit_key_frac"] < 0.3 and found["restricted_loss"] > 1.0  # 3 of 11 frequencies explain little
    assert found["excluded_loss"] < 0.1  # removing them leaves the memorised answers in place


def test_measurement_schedule_is_dense_until_past_grokking_then_sparse():
    cfg = E.Config(steps=5000, measure_every=100, measure_sparse_every=500, measure_dense_after=1000)
    plugin = ProgressMeasures()
    plugin.grok_step, plugin.memorised = None, False
    assert [s for s in range(10, 5001, 10) if plugin.due(cfg, s)] == list(range(500, 5001, 500))  # not memorised
    plugin.memorised = True
    assert [s for s in range(10, 5001, 10) if plugin.due(cfg, s)] == list(range(100, 5001, 100))
    plugin.grok_step = 2030
    due = [s for s in range(10, 5001, 10) if plugin.due(cfg, s)]
    assert due == list(range(100, 3001, 100)) + [3500, 4000, 4500, 5000]


def test_measures_log_every_measure_and_do_not_change_training(tiny_run, tmp_path):
    for op in ("x_plus_y", "permutation"):
        rows = [json.loads(line) for line in open(tiny_run / f"{op}_0" / "measures.jsonl")]
        assert [r["step"] for r in rows] == [0, 20, 40, 60]
        log = {r["step"]: r for r in (json.loads(line) for line in open(tiny_run / f"{op}_0" / "log.jsonl"))}
        assert rows[-1]["val_acc"] == pytest.approx(log[60]["val_acc"])  # the evaluation's own forward pass
        for layer in ("first", "last"):
            assert set(rows[-1]["values"][layer]) == {"train", "val", "all"}
    assert set(rows[-1]["values"]["model"]["train"]) == {"logit_norm", "softmax_collapse"}  # permutation: no Fourier
    run_script("experiment.py", ["--out_dir=off", *TINY, "--measure=false", "--capture=false"], tmp_path)
    for op in ("x_plus_y", "permutation"):
        for seed in (0, 1):
            assert read_json(tmp_path / "off" / f"final_info_{op}_{seed}.json") == \
                read_json(tiny_run / f"final_info_{op}_{seed}.json")
            assert open(tmp_path / "off" / f"{op}_{seed}" / "log.jsonl").read() == \
                open(tiny_run / f"{op}_{seed}" / "log.jsonl").read()
            assert not (tmp_path / "off" / f"{op}_{seed}" / "measures.jsonl").exists()


def test_load_model_rebuilds_the_final_model_offline(tiny_run):
    model = load_model(E, str(tiny_run), "x_plus_y", 1)
    task = E.make_task("x_plus_y", 11)
    _, val_idx = E.split_pairs(len(task.y), 0.5, 1)
    with torch.no_grad():
        accuracy = (model(task.x[val_idx]).argmax(-1) == task.y[val_idx]).float().mean().item()
    assert not model.training
    assert accuracy == pytest.approx(read_json(tiny_run / "final_info_x_plus_y_1.json")["final_val_acc"])
    with open(tiny_run / "x_plus_y_1" / "model.safetensors", "rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8)[:8], "little"))
    assert b"blocks.1.ffn_norm.weight" in header


def test_the_spectrum_of_the_training_pairs_against_numpy():
    """spectral_entropy and effective_rank from the covariance eigenvalues, as numpy computes them; the limits:
    variance spread evenly over d directions (1 and d), all in one (0 and 1)."""
    import numpy as np

    even = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    assert M.spectrum_metrics(even) == pytest.approx({"spectral_entropy": 1.0, "effective_rank": 2.0})
    line = torch.tensor([[1.0, 0], [-1, 0], [2, 0], [-2, 0]])
    assert M.spectrum_metrics(line) == pytest.approx({"spectral_entropy": 0.0, "effective_rank": 1.0}, abs=1e-9)
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3, 1, 1, 0.5, 0.1])
    eig = np.clip(np.linalg.eigvalsh(np.cov(x.numpy().T)), 0, None)
    p = eig / eig.sum()
    h = -(p * np.log(p)).sum()
    assert M.spectrum_metrics(x) == pytest.approx({"spectral_entropy": h / np.log(6), "effective_rank": np.exp(h)},
                                                  rel=1e-5)


def test_the_distance_ratio_against_a_direct_computation():
    import numpy as np

    x = torch.tensor([[-1.0], [-3.0], [1.0], [3.0]])  # centroids -2 and 2 (4 apart), each pair 1 from its own
    assert M.distance_ratio(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(4.0)
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(60) % 4
    c = np.stack([x.numpy()[y.numpy() == k].mean(0) for k in range(4)])
    inter = np.mean([np.linalg.norm(c[i] - c[j]) for i in range(4) for j in range(4) if i != j])
    intra = np.mean(np.linalg.norm(x.numpy() - c[y.numpy()], axis=1))
    assert M.distance_ratio(x, y) == pytest.approx(inter / intra, rel=1e-6)
    # label-free where the spectrum is: a predictor by lab.schema.reads
    from lab.schema import is_predictor, reads
    assert all(is_predictor(reads("last", "train", m)) for m in ("spectral_entropy", "effective_rank",
                                                                  "distance_ratio"))
    # in every measurement of a layer, on the training pairs
    is_train = torch.arange(60) < 40
    got = M.representation_metrics(x, y, is_train, M.metric_samples(is_train, 0))
    assert {(m, s) for m, s, _ in got} >= {("spectral_entropy", "train"), ("effective_rank", "train"),
                                           ("distance_ratio", "train")}
    assert dict(((m, s), v) for m, s, v in got)[("distance_ratio", "train")] == pytest.approx(
        M.distance_ratio(x[is_train], y[is_train]))


def test_the_training_loss_low_frequency_power_against_a_direct_fit():
    """loss_lowfreq: the variance of log10 loss's lowest frequencies after the trend, against a least-squares fit
    of those sines and cosines; a trend alone has none, a fast oscillation none, and fewer than LOWFREQ_MIN none."""
    import numpy as np

    n = 64
    t = np.arange(n)
    slow = 0.3 * np.cos(2 * np.pi * 2 * (t - (n - 1) / 2) / n)  # frequency 2 (of the lowest), even: no trend in it
    fast = 0.5 * np.sin(2 * np.pi * 20 * t / n)
    trend = -3 - 0.02 * t
    assert M.lowfreq_power(10 ** trend) == pytest.approx(0, abs=1e-20)
    assert M.lowfreq_power(10 ** (trend + fast)) == pytest.approx(0, abs=1e-4)
    assert M.lowfreq_power(10 ** (trend + slow + fast)) == pytest.approx(0.3 ** 2 / 2, rel=0.02)
    x = np.random.default_rng(0).normal(size=n).cumsum()  # any curve: the projection on those frequencies
    design = np.column_stack([np.ones(n), t])
    residual = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    waves = np.column_stack([f(2 * np.pi * k * t / n) for k in range(1, M.LOWFREQ_BINS + 1) for f in (np.cos, np.sin)])
    fitted = waves @ np.linalg.lstsq(waves, residual, rcond=None)[0]
    assert M.lowfreq_power(10 ** x) == pytest.approx(np.mean(fitted ** 2), rel=1e-9)
    assert math.isnan(M.lowfreq_power([1e-3] * (M.LOWFREQ_MIN - 1)))


def test_the_weight_spectrum_tail_exponent_against_a_direct_hill_estimate():
    """hill_alpha on a known Pareto sample recovers its exponent; weight_alpha is the mean over the model's 2-D
    matrices of each one's Hill estimate from numpy's singular values, and reads the weights only."""
    import numpy as np
    from lab.schema import reads

    rng = np.random.default_rng(0)
    pareto = torch.tensor(rng.pareto(2.0, 20000) + 1)  # density ~ x^-3: tail exponent 3 in the ESD's convention
    assert M.hill_alpha(pareto, share=0.2) == pytest.approx(3.0, rel=0.05)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 12),
                                torch.nn.Linear(12, 4))  # the last (4 x 12) is below MIN_SIDE: not read

    def hill(w):
        lam = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)[::-1]
        k = max(2, int(len(lam) * M.HILL_SHARE))
        return 1 + (k - 1) / np.log(lam[: k - 1] / lam[k - 1]).sum()

    expected = np.mean([hill(m.weight.detach().double().numpy()) for m in (model[0], model[2])])
    assert M.weight_alpha(model) == pytest.approx(expected, rel=1e-9)
    assert reads("model", "all", "weight_alpha") == "weights" and reads("model", "train", "loss_lowfreq") == "train"
