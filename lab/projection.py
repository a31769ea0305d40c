"""The class-centroid projection behind plot.py's PCA panels and GIFs: the plane in which the answer classes are
arranged (a Fourier ring for a cyclic op), and the frames of an animation aligned onto its last one. Analysis, no
drawing: plot.py draws what these return."""

import numpy as np


def centroid_axes(x: np.ndarray, y: np.ndarray, cycle, freq=None):
    """(mean (d,), 2 axes (2, d), their share of the centroids' variance, a description, the frequency used).

    The axes describe how the answer classes are arranged rather than where most of the pairs' variance lies.
    cycle: the op's answer classes in the order of its group (plot.class_cycle), None for an op without one. For
    the cyclic ops: the plane of the class centroids' strongest Fourier frequency k over the group order (or
    `freq`), on which a Fourier representation is a ring; otherwise the centroids' two principal axes."""
    classes, inverse = np.unique(y, return_inverse=True)
    centroids = np.zeros((len(classes), x.shape[1]))
    np.add.at(centroids, inverse, x)
    centroids /= np.bincount(inverse)[:, None]
    mean = centroids.mean(0)
    centred = centroids - mean
    total = max((centred ** 2).sum(), 1e-30)
    if cycle is not None and len(classes) == int(y.max()) + 1:
        spectrum = np.fft.fft(centred[cycle], axis=0)  # (m, d): row k is frequency k over the group order
        power = (np.abs(spectrum[1: len(cycle) // 2 + 1]) ** 2).sum(1)
        k = int(freq) if freq is not None else int(power.argmax()) + 1
        first = spectrum[k].real / max(np.linalg.norm(spectrum[k].real), 1e-30)
        second = spectrum[k].imag - (spectrum[k].imag @ first) * first
        if np.linalg.norm(second) < 1e-6 * np.linalg.norm(spectrum[k].real):  # k = m/2: a line (+1, -1, ...), not
            rest = centred - np.outer(centred @ first, first)  # a plane: add the centroids' main other direction
            second = np.linalg.svd(rest, full_matrices=False)[2][0]
        plane = np.stack([first, second / np.linalg.norm(second)], axis=1)  # (d, 2) orthonormal
        directions = plane.T
        share = ((centred @ plane) ** 2).sum(0) / total
        return mean, directions, share, f"centroids' Fourier plane k={k}", k
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    return mean, directions[:2], singular[:2] ** 2 / total, "centroids' principal axes", None


def aligned_frames(snapshots: list, y: np.ndarray, cycle, shown: np.ndarray) -> tuple[list, str, int | None]:
    """([(snapshot, points (len(shown), 2), centroids (classes, 2), share), ...], the axes' name, the frequency):
    every snapshot's representation (snapshots: [(snapshot, x (n, d)), ...] by step) projected on its own centroid
    plane of the final snapshot's frequency, scaled to unit root-mean-square radius and rotated (orthogonal
    Procrustes on the centroids) onto the final frame, so that motion between frames is the representation's."""
    *_, axes_name, freq = centroid_axes(snapshots[-1][1], y, cycle)  # one plane for every frame: the final one's
    classes, inverse = np.unique(y, return_inverse=True)
    frames = []
    for snap, x in snapshots:
        mean, directions, share, _, _ = centroid_axes(x, y, cycle, freq)
        points = (x - mean) @ directions.T  # (n, 2)
        centroids = np.zeros((len(classes), 2))
        np.add.at(centroids, inverse, points)
        centroids /= np.bincount(inverse)[:, None]
        scale = max(np.sqrt((points ** 2).sum(1).mean()), 1e-12)  # unit spread: frames compare by shape
        frames.append((snap, points[shown] / scale, centroids / scale, share))
    reference = frames[-1][2]
    aligned = []
    for snap, points, centroids, share in frames:
        u, _, vt = np.linalg.svd(centroids.T @ reference)
        rotation = u @ vt  # orthogonal (2, 2) minimising |centroids @ R - reference|
        aligned.append((snap, points @ rotation, centroids @ rotation, share))
    return aligned, axes_name, freq
