"""The training loop, one for every path: one model (experiment.train_one) or a batch of models trained as one
(lab/batched.py), here or in a Ray worker. It owns what no idea changes: the stop signal, the evaluation schedule,
the metrics of log.jsonl, the grokking step, the history and its flushes, checkpoints, early stopping and each job's
files. What a model's update is comes from the caller: `steps`, an object with

    steps(step, active) -> (losses (len(active),), correct (len(active),), rows, lrs)
        one update of the models at `active` (indices into runs): their mean training losses and correct counts
        as tensors, the rows each trained on, and the learning rate each used (a list of floats);
    steps.validate(step, active) -> (val losses, val accuracies)
        lists in the order of active; it sets each run's eval_outputs and eval_step;
    steps.keep(index)
        only the models at positions `index` of active go on (the others finished).

experiment.py's make_update is the update of one model; lab.batched.StackedUpdate that of a batch."""

import os
import signal
import time

import torch

from lab.files import write_jsonl
from lab.job import STOP, save_checkpoint, write_job
from lab.schema import LOG, grokked


def train(runs: list, steps, final_info_of, report=None, quiet: tuple = ()) -> list:
    """Train runs (lab.plugins.Run, prepared by experiment.prepare) to their step budget or early stop, writing each
    job's files as it finishes (final_info_of(run, grokking step), the plugins' on_train_end, lab.job.write_job).
    Returns their records in order. report(job, step, metrics) at every evaluation, except for the jobs in quiet
    (a batch's ghosts)."""
    cfgs = [run.cfg for run in runs]
    cfg0, device = cfgs[0], runs[0].device
    for run in runs:
        run.hooks.on_train_begin(run)
    active = list(range(len(runs)))  # runs[active[i]] is row i of the update's tensors
    loss_sum = torch.zeros(len(runs), device=device)
    correct = torch.zeros(len(runs), device=device, dtype=torch.long)
    seen = rows = 0
    grok_step = [None] * len(runs)
    records = [None] * len(runs)
    start = time.perf_counter()
    for run in runs:
        run.model.train()
    for step in range(1, cfg0.steps + 1):
        if STOP.is_set():  # a stop signal arrived in a child: unwind here, at a known point
            raise SystemExit(128 + signal.SIGTERM)
        for k in active:
            runs[k].step = step
        losses, right, trained, lrs = steps(step, active)
        loss_sum += losses
        correct += right
        seen += 1
        rows += trained
        for k in active:
            runs[k].hooks.on_step_end(runs[k], step)
        stopped = []
        if step % cfg0.eval_every == 0 or step == cfg0.steps:
            val_loss, val_acc = steps.validate(step, active)
            train_loss, train_correct = [v / seen for v in loss_sum.tolist()], correct.tolist()
            loss_sum.zero_(), correct.zero_()
            for i, k in enumerate(active):
                run = runs[k]
                metrics = {"step": step, "train_loss": train_loss[i], "train_acc": train_correct[i] / rows,
                           "val_loss": val_loss[i], "val_acc": val_acc[i], "lr": lrs[i]}
                if grok_step[k] is None and grokked(val_acc[i]):
                    grok_step[k] = step
                run.hooks.on_eval(run, step, metrics)
                run.history.append(metrics)
                if report and run.job not in quiet:
                    report(run.job, step, metrics)
                if step % cfg0.capture_every == 0:  # keep the log of a long run readable while it trains
                    write_jsonl(os.path.join(run.out_dir, LOG), run.history)
                if val_acc[i] > cfgs[k].stop_at_val_acc:
                    stopped.append(k)
            seen = rows = 0
        if cfg0.checkpoint_every and step % cfg0.checkpoint_every == 0:
            for k in active:
                if k not in stopped:  # a model stops before its checkpoint of that step
                    save_checkpoint(runs[k], step)
        finished = list(active) if step == cfg0.steps else stopped
        for k in finished:
            final_info = final_info_of(runs[k], grok_step[k])
            runs[k].hooks.on_train_end(runs[k], final_info)
            records[k] = write_job(runs[k].cfg, runs[k].job, runs[k], final_info, time.perf_counter() - start)
        if finished:
            keep = [i for i, k in enumerate(active) if k not in finished]
            active = [active[i] for i in keep]
            if not active:
                break
            index = torch.tensor(keep)
            steps.keep(index)
            loss_sum, correct = loss_sum[index.to(device)], correct[index.to(device)]
    return records


class OneModel:
    """The `steps` of one model: update(step) -> (loss, correct, rows, lr) and validate(step) -> (val loss, val
    accuracy), as experiment.py writes them, in the loop's list form."""

    def __init__(self, update, validate):
        self.update, self.validate_one = update, validate

    def __call__(self, step: int, active: list):
        loss, correct, rows, lr = self.update(step)
        return loss, correct, rows, [lr]

    def validate(self, step: int, active: list):
        val_loss, val_acc = self.validate_one(step)
        return [val_loss], [val_acc]

    def keep(self, index) -> None:
        """One model: nothing goes on once it finishes (the loop ends)."""
