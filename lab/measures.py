"""The metric implementations, one of each: the measures plugin computes them densely during training and
plot.py on saved snapshots. Tables in docs/analysis.md ("Metrics")."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def fourier_spectrum(embedding: torch.Tensor) -> torch.Tensor:
    """Power of a (p, d) embedding of the residues 0..p-1 at frequencies 0..p//2, after centring.

    Centring removes the mean embedding (frequency 0), which says nothing about the algorithm.
    Frequencies k and p-k are one real frequency, so their powers are added.
    """
    p = embedding.shape[0]
    centred = embedding.double() - embedding.double().mean(0)
    power = torch.fft.fft(centred, dim=0).abs().pow(2).sum(1)  # (p,)
    folded = power[: p // 2 + 1].clone()
    folded[1:] += power.flip(0)[: p // 2]  # power[p - k] for k = 1..p//2
    if p % 2 == 0:
        folded[-1] = power[p // 2]  # the Nyquist frequency is its own partner
    return folded


def fourier_sparsity(spectrum: torch.Tensor, k: int) -> tuple[float, list]:
    """(share of the power in the top-k frequencies, those frequencies, strongest first)."""
    order = spectrum[1:].argsort(descending=True)[:k] + 1
    return (spectrum[order].sum() / spectrum.sum()).item(), order.tolist()


def representation_quality(embedding: torch.Tensor, tol: float) -> float:
    """RQI after Liu et al. 2022: the share of parallelograms i + j = m + n (mod p), {i, j} != {m, n},
    that close in the standardised embedding.

    Vector sums cannot close modulo p (Z_p has no non-trivial additive embedding in R^d, so even a
    perfect ring fails that test), so closure is tested where modular addition is exact: on the
    circle of the embedding's strongest Fourier frequency. Each residue's standardised embedding is
    projected onto that frequency's plane, giving a unit phase u_i, and the parallelogram closes when
    |u_i u_j - u_m u_n| < tol. A ring scores 1, random vectors about tol / pi.
    """
    p = embedding.shape[0]
    e = embedding.double() - embedding.double().mean(0)
    e = e / e.pow(2).sum(1).mean().sqrt()  # rows of unit root-mean-square norm
    coefficients = torch.fft.fft(e, dim=0)  # (p, d): row k is frequency k
    k = int(fourier_spectrum(e)[1:].argmax()) + 1
    z = e.to(coefficients.dtype) @ coefficients[k].conj()  # (p,) position on that frequency's circle
    u = z / z.abs().clamp_min(1e-12)
    closed = total = 0
    i = torch.arange(p)
    for s in range(p):
        j = (s - i) % p
        keep = i <= j  # each unordered pair {i, j} with i + j = s once
        products = (u[i[keep]] * u[j[keep]])[:, None]  # (n_pairs, 1)
        dist = torch.cdist(torch.view_as_real(products).flatten(1), torch.view_as_real(products).flatten(1))
        upper = torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)
        closed += (dist[upper] < tol).sum().item()
        total += upper.sum().item()
    return closed / total


def class_centroids(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (n_classes, d), counts (n_classes,)); a class without rows has a zero centroid and count 0."""
    counts = torch.bincount(y, minlength=n_classes)
    sums = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return sums / counts.clamp_min(1)[:, None].to(x.dtype), counts


def silhouette(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean silhouette by class, as sklearn's silhouette_score on the same rows (a lone member scores 0)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inverse)
    sums = torch.cdist(x.float(), x.float()) @ F.one_hot(inverse, len(classes)).float()  # (n, C) distance sums
    per_class = sums.double() / counts  # mean distance from each row to each class
    rows = torch.arange(len(x))
    own_count = counts[inverse].double()
    inside = per_class[rows, inverse] * own_count / (own_count - 1).clamp_min(1)  # mean over the other members
    per_class[rows, inverse] = math.inf
    nearest = per_class.min(1).values
    score = (nearest - inside) / torch.maximum(inside, nearest).clamp_min(1e-300)
    return score.masked_fill(own_count == 1, 0.0).mean().item()


def davies_bouldin(x: torch.Tensor, y: torch.Tensor) -> float:
    """sklearn's davies_bouldin_score, vectorised over classes."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centroids, counts = class_centroids(x.double(), inverse, len(classes))
    spread = torch.zeros(len(classes), dtype=torch.float64).index_add_(
        0, inverse, (x - centroids[inverse].float()).norm(dim=1).double()) / counts
    gaps = torch.cdist(centroids, centroids)
    if torch.allclose(spread, torch.zeros_like(spread)) or torch.allclose(gaps, torch.zeros_like(gaps)):
        return 0.0
    gaps.fill_diagonal_(math.inf)
    gaps[gaps == 0] = math.inf
    return ((spread[:, None] + spread[None]) / gaps).max(1).values.mean().item()


def scatter_metrics(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Calinski-Harabasz (as sklearn's) and nc1 = tr(S_w S_b^+)/C with class-balanced scatters (Papyan et al.)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    n, n_classes = len(x), len(classes)
    centroids, counts = class_centroids(x.float(), inverse, n_classes)
    centred = x - centroids[inverse]
    s_w = (centred.T @ centred).double() / n  # (d, d)
    within = torch.trace(s_w) * n
    centroids = centroids.double()
    between_weighted = (counts[:, None] * (centroids - x.double().mean(0)).pow(2)).sum()
    calinski = (between_weighted * (n - n_classes) / (within * (n_classes - 1))).item() if within > 0 else 1.0
    between = centroids - centroids.mean(0)
    s_b = between.T @ between / n_classes
    nc1 = torch.trace(s_w @ torch.linalg.pinv(s_b, rtol=1e-6, hermitian=True)).item() / n_classes
    return {"calinski_harabasz": calinski, "nc1": nc1}


def within_class_var(x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(S_w) / tr(S_total) over the rows given: the within-class share of the variance (Sakamoto and Sato's
    whole-population within-class variance, made scale-free)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centroids, _ = class_centroids(x.float(), inverse, len(classes))
    within = (x - centroids[inverse]).pow(2).sum(1).double().sum()
    return (within / (x - x.mean(0)).pow(2).sum(1).double().sum()).item()


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the rows' scatter matrix (the covariance times n - 1: every use below is scale-free)."""
    centred = x.float() - x.float().mean(0)
    return torch.linalg.eigvalsh((centred.T @ centred).double()).clamp_min(0)


def participation_ratio(x: torch.Tensor) -> float:
    """(sum of covariance eigenvalues)^2 / sum of their squares: the effective dimension."""
    eig = covariance_spectrum(x)
    return (eig.sum() ** 2 / eig.pow(2).sum()).item()


def spectrum_metrics(x: torch.Tensor) -> dict:
    """spectral_entropy: the entropy of the covariance eigenvalues as a distribution (p = lambda / sum lambda),
    over log of their number (1: variance spread evenly over every direction, 0: one direction); effective_rank:
    exp of that entropy unnormalised (Roy and Vetterli 2007). Label-free (Truong et al. 2026's spectral entropy)."""
    eig = covariance_spectrum(x)
    p = eig / eig.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"spectral_entropy": (entropy / math.log(len(eig))).item() if len(eig) > 1 else 0.0,
            "effective_rank": entropy.exp().item()}


def distance_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    """Inter/intra-class distance ratio: the mean Euclidean distance between class centroids over the mean distance
    of each row to its class's centroid (higher: classes further apart than they are wide)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centroids, _ = class_centroids(x.float(), inverse, len(classes))
    between = torch.cdist(centroids.double(), centroids.double())
    inter = between.sum() / (len(classes) * (len(classes) - 1))
    intra = (x.double() - centroids.double()[inverse]).norm(dim=1).mean()
    return (inter / intra).item() if intra > 0 else float("inf")


def metric_samples(is_train: torch.Tensor, seed: int, silhouette_rows: int = 500, knn_queries: int = 250) -> dict:
    """Fixed seeded subsamples (row indices) for the silhouette of each split and the kNN queries (val rows)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for split, rows in (("train", torch.nonzero(is_train).flatten()), ("val", torch.nonzero(~is_train).flatten())):
        out[f"silhouette_{split}"] = rows[torch.randperm(len(rows), generator=gen)[:silhouette_rows]].sort().values
    val = torch.nonzero(~is_train).flatten()
    out["knn"] = val[torch.randperm(len(val), generator=gen)[:knn_queries]].sort().values
    return out


def representation_metrics(x: torch.Tensor, y: torch.Tensor, is_train: torch.Tensor, samples: dict,
                           knn_k: int = 5) -> list:
    """[(metric, split, value)] of one layer's representations x (n, d) with answer classes y and split mask.

    Table in docs/analysis.md ("Metrics"). Silhouette and kNN use the fixed subsamples of metric_samples.
    """
    x, y, is_train = x.float().cpu(), y.cpu(), is_train.cpu()
    out = []
    for split, mask in (("train", is_train), ("val", ~is_train)):
        xs, ys = x[mask], y[mask]
        n_classes = len(torch.unique(ys))
        if n_classes < 2 or len(ys) <= n_classes:
            continue
        rows = samples[f"silhouette_{split}"]
        out.append(("silhouette", split, silhouette(x[rows], y[rows])))
        out.append(("davies_bouldin", split, davies_bouldin(xs, ys)))
        out += [(metric, split, value) for metric, value in scatter_metrics(xs, ys).items()]
    if is_train.any() and (~is_train).any():
        x_train, y_train, x_val, y_val = x[is_train], y[is_train], x[~is_train], y[~is_train]
        classes = torch.unique(y_train)
        centroids = class_centroids(x_train, torch.searchsorted(classes, y_train), len(classes))[0]
        distances = centroids.pow(2).sum(1) - 2 * x_val @ centroids.T  # + |x|^2, the same for every centroid
        out.append(("ncc_acc", "val", (classes[distances.argmin(1)] == y_val).float().mean().item()))
        queries = samples["knn"]
        k = min(knn_k, len(y_train))
        d = x_train.pow(2).sum(1) - 2 * x[queries] @ x_train.T  # (n_queries, n_train): + |q|^2, the same per row
        neighbours = y_train[d.topk(k, largest=False).indices]  # (n_queries, k)
        votes = F.one_hot(neighbours, int(y.max()) + 1).sum(1)  # ties go to the smallest class, as in sklearn
        out.append(("knn_acc", "val", (votes.argmax(1) == y[queries]).float().mean().item()))
    if len(torch.unique(y[is_train])) >= 2:  # the training pairs' spectrum and class distances
        out += [(metric, "train", value) for metric, value in spectrum_metrics(x[is_train]).items()]
        out.append(("distance_ratio", "train", distance_ratio(x[is_train], y[is_train])))
    out.append(("within_class_var", "all", within_class_var(x, y)))
    out.append(("participation_ratio", "all", participation_ratio(x)))
    return out


@torch.no_grad()
def param_norm(model: nn.Module) -> float:
    """L2 norm of all parameters (the weight-norm view of Omnigrok, Liu et al. 2022)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in model.parameters()])).item()


HILL_SHARE = 0.5  # the share of a matrix's eigenvalues, largest first, that the Hill estimator reads as its tail
MIN_SIDE = 8  # weight_alpha reads the 2-D parameters with both sides at least this (not a 4-position embedding)


def hill_alpha(eigenvalues: torch.Tensor, share: float = HILL_SHARE) -> float:
    """The Hill estimate of a power-law tail exponent of an empirical spectral density: with the eigenvalues
    sorted descending and k = share of them (at least 2), alpha = 1 + (k - 1) / sum_{i<k-1} log(l_i / l_{k-1})."""
    values = eigenvalues.double().sort(descending=True).values
    k = max(2, int(len(values) * share))
    logs = (values[: k - 1] / values[k - 1]).log()
    return 1 + (k - 1) / logs.sum().item() if logs.sum() > 0 else float("nan")


def weight_alpha(model: nn.Module) -> float:
    """Heavy-tailed self-regularisation's layer quality (Martin & Mahoney; Prakash & Martin 2025 on grokking):
    the tail exponent of each weight matrix's eigenvalues of W^T W (squared singular values), by hill_alpha, averaged
    over the 2-D parameters with both sides at least MIN_SIDE; lower: heavier-tailed (more structured). Reads the
    weights only."""
    alphas = [hill_alpha(torch.linalg.svdvals(p.detach().double()) ** 2) for p in model.parameters()
              if p.dim() == 2 and min(p.shape) >= MIN_SIDE]
    alphas = [a for a in alphas if math.isfinite(a)]
    return sum(alphas) / len(alphas) if alphas else float("nan")


LOWFREQ_BINS = 4  # the lowest non-zero frequencies whose power loss_lowfreq sums
LOWFREQ_MIN = 8  # evaluations since memorisation before loss_lowfreq is defined


def lowfreq_power(losses) -> float:
    """Notsawo et al. 2023's spectral signature of the learning curve, read from memorisation on: the training
    losses logged at each evaluation since memorisation, as log10, their least-squares straight line removed; the
    variance carried by its LOWFREQ_BINS lowest non-zero frequencies (rFFT, Parseval: 2 |X_k|^2 / n^2 each; the
    Nyquist bin is not counted). nan with fewer than LOWFREQ_MIN losses. Reads the training pairs."""
    x = torch.as_tensor(losses, dtype=torch.float64).clamp_min(torch.finfo(torch.float32).tiny).log10()
    n = len(x)
    if n < LOWFREQ_MIN:
        return float("nan")
    t = torch.arange(n, dtype=torch.float64)
    design = torch.stack([torch.ones(n, dtype=torch.float64), t], 1)
    residual = x - design @ torch.linalg.lstsq(design, x[:, None]).solution[:, 0]
    bins = min(LOWFREQ_BINS, (n - 1) // 2)
    return (2 * torch.fft.rfft(residual)[1: bins + 1].abs().pow(2).sum() / n ** 2).item()


def logit_stats(logits: torch.Tensor, y: torch.Tensor, loss) -> dict:
    """logit_norm: mean L2 norm of the logit vectors; softmax_collapse: share of rows whose probability of the true
    class (loss.probs: the softmax, for cross-entropy), in the logits' float type (float32, or float64 in an fp64
    run), is exactly 1.0 (Prieto et al. 2025: their gradient vanishes)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    p_true = loss.probs(logits).gather(1, y[:, None])
    return {"logit_norm": torch.linalg.vector_norm(logits, dim=-1).mean().item(),
            "softmax_collapse": (p_true == 1.0).float().mean().item()}


class FourierBasis:
    """The unit directions cos(w_k (i + sign j)) and sin(w_k (i + sign j)), w_k = 2 pi k / m, k = 1 .. m//2, over
    the m x m grid of a cyclic op: the "answer structure" of Nanda et al. 2023, in which logits
    cos(w_k (i + sign j - c)) = cos(w_k c) cos(w_k (i + sign j)) + sin(w_k c) sin(w_k (i + sign j)) lie."""

    def __init__(self, i: torch.Tensor, j: torch.Tensor, m: int, sign: int):
        self.m, self.grid = m, i * m + j  # (n,) position of each pair on the flattened grid
        assert torch.equal(torch.sort(self.grid).values, torch.arange(m * m)), "pairs must cover the grid once"
        freqs = torch.arange(1, m // 2 + 1, dtype=torch.float64)
        t = torch.arange(m, dtype=torch.float64)
        angle = 2 * math.pi * freqs[:, None, None] * (t[None, :, None] + sign * t[None, None, :]) / m
        basis = torch.stack([angle.cos(), angle.sin()], 1).reshape(len(freqs), 2, m * m)  # (K, 2, m^2)
        norms = basis.norm(dim=-1, keepdim=True)
        self.basis = torch.where(norms > 1e-9, basis / norms.clamp_min(1e-9), 0.0).float()  # sin at k = m/2 is 0
        self.freqs = freqs.long()


def fourier_progress(logits: torch.Tensor, y: torch.Tensor, is_train: torch.Tensor, fb: FourierBasis,
                     k: int, loss, key: torch.Tensor | None = None) -> dict:
    """Nanda et al. 2023's progress measures from the logits (n, C) of every pair of a cyclic op (rows as in fb);
    the losses are `loss` (the run's, e.g. cross-entropy) of modified logits.

    key_freqs: the k frequencies whose directions hold the most of the logits' power (or those of `key`, indices
      into fb.freqs, when given: e.g. the final model's, as Nanda et al. take them); key_index: their indices;
      key_shares: each one's share of the power in all frequencies;
    logit_key_frac: their share of the power of the logits centred over the grid;
    restricted_loss: loss on every pair of the logits reduced to the key frequencies' components plus each
      class's mean logit (the paper's bias correction);
    excluded_loss: loss on the training pairs of the logits with the key frequencies' components removed.
    """
    grid = torch.empty_like(logits)
    grid[fb.grid] = logits.float()  # (m^2, C), rows in grid order
    labels = torch.empty_like(y)
    labels[fb.grid] = y
    train = torch.zeros(len(grid), dtype=torch.bool, device=grid.device)
    train[fb.grid] = is_train
    basis = fb.basis.to(grid.device)
    coef = torch.einsum("fzg,gc->fzc", basis, grid)  # (K, 2, C) projections onto each direction
    power = coef.pow(2).sum((1, 2))  # (K,)
    total = (grid - grid.mean(0)).pow(2).sum()
    if key is None:
        key = power.topk(min(k, len(power))).indices
    components = torch.einsum("fzg,fzc->gc", basis[key], coef[key])  # (m^2, C)
    restricted = components + grid.mean(0)
    excluded = grid - components
    return {"restricted_loss": loss(restricted, labels).item(),
            "excluded_loss": loss(excluded[train], labels[train]).item(),
            "logit_key_frac": (power[key].sum() / total).item() if total > 0 else 0.0,
            "key_freqs": fb.freqs[key.cpu()].tolist(), "key_index": key,
            "key_shares": (power[key] / power.sum().clamp_min(1e-30)).tolist()}


