"""What experiment.py writes and plot.py reads: file names, job names, thresholds and the metric registry."""

import dataclasses
import os
from dataclasses import dataclass

# ----------------------------------------------------------------------------- files of a run
CONFIG = "config.json"  # out_dir/config.json: the resolved Config
FINAL_INFO = "final_info.json"  # out_dir/final_info.json: the template's schema, per op
LOG = "log.jsonl"  # per job: one row per evaluation
MEASURES = "measures.jsonl"  # per job: the measures plugin's rows
EXAMPLES = "examples.parquet"  # per job: one row per pair, aligned with every snapshot
MODEL = "model.safetensors"  # per job: the final weights
FINAL_KEYS = "final_keys.json"  # per job, derived by plot.py from checkpoints/ (lab/final_keys.py)
CHECKPOINTS = "checkpoints"  # per job, with --checkpoint_every: step_{step:07d}.safetensors
RUN = "run.json"  # per job: seeds, timings, device
SWEEP = "sweep.json"  # out_dir/sweep.json of a sweep: its fields, values and cells (each a run folder)
ACTIVATIONS = "activations"  # per job: snapshot folder, with index.json
INDEX = "index.json"


@dataclass(frozen=True)
class Job:
    """One model to train: an op, a seed, and Config overrides ((field, value), ...) for what differs from the
    run's Config: a sweep cell's values, in the sweep's order."""

    op: str
    seed: int
    overrides: tuple = ()

    @property
    def name(self) -> str:
        return job_name(self.op, self.seed, self.overrides)

    def config(self, cfg):
        """The Config this job trains with: the run's, with the job's overrides."""
        return dataclasses.replace(cfg, **dict(self.overrides))


def job_name(op: str, seed: int, overrides: tuple = ()) -> str:
    """The one naming of a job: x_plus_y_0, or with overrides x_plus_y_0__train_frac=0.3__weight_decay=1.0."""
    return "__".join([f"{op}_{seed}", *(f"{field}={value}" for field, value in overrides)])


def cell_name(overrides: tuple) -> str:
    """A sweep cell's folder: train_frac=0.3__weight_decay=1.0 (its values in the sweep's order)."""
    return "__".join(f"{field}={value}" for field, value in overrides)


def run_dir_of(out_dir: str, job: Job) -> str:
    """The run folder that holds a job: out_dir, or its sweep cell's folder out_dir/{cell_name}."""
    return os.path.join(out_dir, cell_name(job.overrides)) if job.overrides else out_dir


def job_dir(out_dir: str, job: Job) -> str:
    return os.path.join(run_dir_of(out_dir, job), f"{job.op}_{job.seed}")


def final_info_file(out_dir: str, job: Job) -> str:
    """Written last for a job: its presence marks the job finished."""
    return os.path.join(run_dir_of(out_dir, job), f"final_info_{job.op}_{job.seed}.json")


# ----------------------------------------------------------------------------- thresholds
GROKKED_ABOVE = 0.99  # val acc above this at an evaluation: grokked (the template's step_val_acc_99)
MEMORISED_AT = 0.99  # train acc at least this at an evaluation: memorised
BEFORE_BELOW = 0.1  # phases by val acc: before (< 0.1), during, after (grokked: > GROKKED_ABOVE)
HALF_AT = 0.5  # val acc at least this: half-way (the half step; the event an early-warning alarm must precede)


def grokked(val_acc: float) -> bool:
    """Whether an evaluation's val accuracy counts as grokked: the one definition (the grokking step is the first
    evaluation where it does)."""
    return val_acc > GROKKED_ABOVE


def memorised(train_acc: float) -> bool:
    """Whether an evaluation's train accuracy counts as memorised (the memorisation step: the first where it does)."""
    return train_acc >= MEMORISED_AT


def first_step(log: list, key: str, reached) -> int | None:
    """The step of the first evaluation in log (rows of log.jsonl) whose `key` satisfies reached; None if none."""
    return next((r["step"] for r in log if reached(r[key])), None)


def grok_step(log: list) -> int | None:
    """The grokking step: the first evaluation with val accuracy above GROKKED_ABOVE (the template's
    step_val_acc_99)."""
    return first_step(log, "val_acc", grokked)


def memorisation_step(log: list) -> int | None:
    """The memorisation step: the first evaluation with train accuracy at least MEMORISED_AT."""
    return first_step(log, "train_acc", memorised)


def half_step(log: list) -> int | None:
    """The first evaluation with val accuracy at least HALF_AT."""
    return first_step(log, "val_acc", lambda acc: acc >= HALF_AT)


def phase_of(val_acc: float) -> str:
    """before (< BEFORE_BELOW), during, after (grokked: above GROKKED_ABOVE); an unknown accuracy (step 0) is
    before."""
    if not val_acc >= BEFORE_BELOW:
        return "before"
    return "after" if grokked(val_acc) else "during"


# ----------------------------------------------------------------------------- metric registry
LAYERS = ("first", "last")  # the two representation layers: a model's capture_modules keys
METRIC_SPLITS = {  # representation metric -> the splits it is computed on
    "silhouette": ("train", "val"),
    "davies_bouldin": ("train", "val"),
    "calinski_harabasz": ("train", "val"),
    "nc1": ("train", "val"),
    "ncc_acc": ("val",),
    "knn_acc": ("val",),
    "within_class_var": ("all",),
    "participation_ratio": ("all",),
    "spectral_entropy": ("train",),
    "effective_rank": ("train",),
    "distance_ratio": ("train",),
}
METRIC_TITLES = {
    "silhouette": "silhouette (higher: tighter classes)",
    "davies_bouldin": "Davies-Bouldin (lower: better separated)",
    "calinski_harabasz": "Calinski-Harabasz (higher: better separated)",
    "nc1": "nc1 = tr(S_w S_b^+)/C (lower: collapsed)",
    "ncc_acc": "nearest-centroid acc (val, train centroids)",
    "knn_acc": "kNN acc (val, k=5 train neighbours)",
    "within_class_var": "within-class share of variance (all pairs)",
    "participation_ratio": "participation ratio (effective dim)",
    "spectral_entropy": "spectral entropy / log d (train pairs)",
    "effective_rank": "effective rank exp(H) (train pairs)",
    "distance_ratio": "inter/intra-class distance (train pairs)",
}
MODEL_MEASURES = {  # layers model / embedding: metric -> title
    "param_norm": "param_norm: L2 norm of all weights",
    "weight_alpha": "weight_alpha: eigenvalue tail exponent (Hill)",
    "loss_lowfreq": "train loss low-frequency power since mem.",
    "logit_norm": "logit_norm (train pairs)",
    "softmax_collapse": "softmax_collapse (train pairs)",
    "grad_norm": "grad_norm: the last update's gradient",
    "restricted_loss": "restricted loss (each step's key freqs only, all pairs)",
    "excluded_loss": "excluded loss (each step's key freqs removed, train)",
    "restricted_loss_final_keys": "restricted loss (final model's key freqs only, all pairs)",
    "excluded_loss_final_keys": "excluded loss (final model's key freqs removed, train)",
    "logit_key_frac": "logits' power in the key freqs",
    "fourier_topk_frac": "embedding power in top-k freqs",
    "rqi": "RQI of the embedding",
}
READS = {  # what a measure reads (and a baseline): a predictor reads no validation labels
    "weights": "the parameters only",
    "train": "the training pairs and their labels",
    "inputs": "held-out pairs' inputs, no labels (e.g. the logits over the whole table)",
    "val_labels": "validation labels",
    "final_model": "the final model (hindsight)",
    "unknown": "not declared (a measure a plugin added): treated as reading validation labels",
    "config": "a baseline's: the configuration and other runs' outcomes, no measurement of this run",
}
PREDICTOR_READS = ("weights", "train", "inputs")
MODEL_READS = {"param_norm": "weights", "weight_alpha": "weights", "loss_lowfreq": "train", "logit_norm": "train", "softmax_collapse": "train",
               "grad_norm": "train", "restricted_loss": "val_labels", "excluded_loss": "train", "restricted_loss_final_keys": "final_model",
               "excluded_loss_final_keys": "final_model", "logit_key_frac": "inputs", "fourier_topk_frac": "weights",
               "rqi": "weights"}  # the MODEL_MEASURES' kinds: restricted loss is a loss on all pairs, val included
UNLABELLED_METRICS = ("participation_ratio", "spectral_entropy", "effective_rank")  # representation metrics that read no class labels


def reads(layer: str, split: str, metric: str) -> str:
    """What one measure (a metrics.csv / leadlag.csv row's layer, split, metric) reads: a key of READS.
    Representation metrics read their split's pairs with labels (split "all": every pair, val included); the
    learning curves their split; model-level measures MODEL_READS."""
    if layer == "log":
        return "train" if split == "train" else "val_labels"
    if layer in LAYERS and metric in METRIC_SPLITS:
        if metric in UNLABELLED_METRICS:
            return "train" if split == "train" else "inputs"
        return {"train": "train", "val": "val_labels", "all": "val_labels"}.get(split, "unknown")
    return MODEL_READS.get(metric, "unknown")


def is_predictor(kind: str) -> bool:
    return kind in PREDICTOR_READS


LOG_METRICS = {"param_norm": "all", "logit_norm": "train", "softmax_collapse": "train", "grad_norm": "train"}  # norms plugin, in log.jsonl
PLUGIN_FILES = {"fourier": ("topk_frac", "fourier_topk_frac"), "rqi": ("rqi", "rqi")}  # file -> (key, metric)
LOG_MEASURES = [("train", "loss", "train_loss"), ("val", "loss", "val_loss"), ("train", "acc", "train_acc"),
                ("val", "acc", "val_acc")]  # learning curves as measures: (split, metric, log key), layer "log"
