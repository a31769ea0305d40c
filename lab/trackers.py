"""Experiment trackers as plugins (Config.tracker: none, tensorboard, wandb, or both comma-separated): each job's
logged rows, progress measures, grokking step, final info and config, in the tool a researcher has open. The JSONL
files stay the source of truth: a tracker that fails (not importable, disk full, anything) prints one line and
stops tracking that job; the results are the same bytes as an untracked run's.

TensorBoard: event files in each job's folder, so `tensorboard --logdir run_0` lists one run per job (a sweep cell's
jobs under its folder). Scalars: log/{key} for every log.jsonl key at every evaluation (the norms plugin's too),
measures/{layer}/{split}/{metric} at every measurement of the measures plugin, final/{key} and the config as text
and as hyperparameters (TensorBoard's HParams tab, with the final info as hparams/{key}) at the end.

wandb: one offline run per job (WANDB_MODE=offline unless set otherwise; no network), under <run folder>/wandb
(a sweep's folder for all its cells), grouped by run folder and sweep cell ("run_0/train_frac=0.3"); the same scalars (log/..., measures/...), the config as its config, and the
final info (and grok_step) as its summary. Upload later with `wandb sync run_0/wandb/offline-run-*`.
"""

import json
import math
import os
import sys

from lab.config import config_dict
from lab.plugins import Plugin, ProgressMeasures
from lab.schema import CONFIG, cell_name

TRACKERS = ("tensorboard", "wandb")


def tracker_names(value: str) -> list:
    """Config.tracker as a list of tracker names ('none' and '' are no tracker)."""
    return [name for name in (n.strip() for n in value.split(",")) if name and name != "none"]


def scalars(values: dict, prefix: str) -> dict:
    """{prefix/key/...: float} of the finite numbers in a nested dict (booleans and strings left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Tracker(Plugin):
    """What both trackers share: when they write, and the one-line failure that switches a job's tracking off."""

    batchable = True  # it reads what the loop hands every job
    last = True  # after every other plugin: it sees the whole log row and the final info

    def on_train_begin(self, run):
        self.live = True
        self.measures = next((p for p in run.hooks.plugins if isinstance(p, ProgressMeasures)), None)
        self.guarded(run, self.open, run)
        if self.measures is not None and self.measures.rows:  # its step-0 measurement, before any evaluation
            self.guarded(run, self.write, 0, scalars(self.measures.rows[-1]["values"], "measures"))

    def on_eval(self, run, step, metrics):
        rows = scalars({k: v for k, v in metrics.items() if k != "step"}, "log")
        if self.measures is not None and self.measures.rows and self.measures.rows[-1]["step"] == step:
            rows.update(scalars(self.measures.rows[-1]["values"], "measures"))
        self.guarded(run, self.write, step, rows)

    def on_train_end(self, run, final_info):
        self.guarded(run, self.close, run, final_info)

    def guarded(self, run, method, *args):
        if not self.live:
            return
        try:
            method(*args)
        except Exception as error:  # never the results: say so once and stop tracking this job
            self.live = False
            print(f"experiment.py: {self.name} tracker off for {run.op} seed {run.seed} ({type(error).__name__}: "
                  f"{error}); the JSONL results are unaffected", file=sys.stderr)

    def open(self, run): ...

    def write(self, step: int, rows: dict): ...

    def close(self, run, final_info: dict): ...


class TensorBoard(Tracker):
    """Writes each job's scalars, config and final info as TensorBoard event files in the job's folder."""

    name = "tensorboard"

    def open(self, run):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=run.out_dir)
        self.config = config_dict(run.cfg)

    def write(self, step, rows):
        for tag, value in rows.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, run, final_info):
        final = scalars(final_info, "final")
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, run.step)
        self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1) + "\n```")
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.items()}
        self.writer.add_hparams(hparams, {f"hparams/{k[6:]}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class Wandb(Tracker):
    """Writes each job as one offline wandb run under <run folder>/wandb, grouped by run folder and sweep cell."""

    name = "wandb"

    def open(self, run):
        import wandb

        folder = os.path.abspath(run.cfg.out_dir)
        group = os.path.basename(folder) + (f"/{cell_name(run.job.overrides)}" if run.job.overrides else "")
        self.run = wandb.init(project="grokking", dir=folder, group=group, name=run.job.name,
                              config=config_dict(run.cfg), mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True,
                                                                           x_disable_stats=True))

    def write(self, step, rows):
        self.run.log(rows, step=step)

    def close(self, run, final_info):
        self.run.summary.update(final_info)
        self.run.finish()


TRACKER_PLUGINS = (TensorBoard, Wandb)


PLOTS = "plots"  # the TensorBoard run, in a tracked run folder, that holds plot.py's figures


def figures_to_tensorboard(figures: list, run_folders: list) -> list:
    """plot.py's PNG figures (paths, or tuples that start with one) as TensorBoard images in <run folder>/plots, for
    each run folder whose config tracked with TensorBoard; the folders written. A failure says so in one line."""
    import matplotlib.image

    tracked = [f for f in run_folders if "tensorboard" in tracker_names(_saved_tracker(f))]
    paths = sorted({(f[0] if isinstance(f, (tuple, list)) else f) for f in figures})
    paths = [p for p in paths if str(p).endswith(".png") and os.path.exists(p)]
    if not tracked or not paths:
        return []
    try:
        from torch.utils.tensorboard import SummaryWriter

        for folder in tracked:
            with SummaryWriter(log_dir=os.path.join(folder, PLOTS)) as writer:
                for path in paths:
                    image = matplotlib.image.imread(path)[..., :3]  # RGBA -> RGB, floats in [0, 1]
                    writer.add_image(os.path.splitext(os.path.basename(path))[0], image, dataformats="HWC")
    except Exception as error:
        print(f"plot.py: figures not written to TensorBoard ({type(error).__name__}: {error})", file=sys.stderr)
        return []
    return tracked


def _saved_tracker(folder: str) -> str:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            return str(json.load(f).get("tracker", "none"))
    except (OSError, ValueError):
        return "none"
