"""The AI-Scientist loop: its harness's commands on a copy of this project, what an agent's edits can do through
plugins, the failure text it gets back, and the findings block plot.py keeps in notes.txt."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import experiment as E
from lab.runner import TEMPLATE_KEYS, summarize
from lab import analysis as A
from lab import report as R
from conftest import ROOT, TINY, exited, make_run, read_json, run_script, wait_until

EXAMPLES = ["xavier_init", "layer_lr", "swap_operands", "step_val_acc_95"]
HARNESS_NOTES = ("# Title: Does operand swapping speed up grokking?\n# Experiment description: swap a and b.\n"
                 "## Run 0: Baseline\nResults: {'x_plus_y': {...}}\nDescription: Baseline results.\n")


def agent_copy(folder, plugins=(), edit=None, workers=1):
    """The project as the harness copies it into an idea folder, with the Config defaults shrunk (the edit an
    agent makes, since the harness passes no flags) and the given plugins added to DEFAULT_PLUGINS. One worker
    by default: the jobs train in the main process, sparing the suite a process start-up (about 5 s) per job;
    workers=0 keeps the harness's default, a pool of one process per core."""
    folder.mkdir(exist_ok=True)
    source = open(os.path.join(ROOT, "experiment.py")).read()
    for old, new in [('ops: tuple[str, ...] = ("x_div_y", "x_minus_y", "x_plus_y", "permutation")',
                      'ops: tuple[str, ...] = ("x_plus_y", "x_minus_y")'),
                     ("    seeds: int = 3  #", "    seeds: int = 2  #"), ("    steps: int = 7500  #", "    steps: int = 60  #"),
                     ("    p: int = 97  #", "    p: int = 11  #"), ("    batch_size: int = 512  #", "    batch_size: int = 64  #"),
                     ("    d_model: int = 128  #", "    d_model: int = 32  #"),
                     ("    workers: int = 0  #", f"    workers: int = {workers}  #"),
                     ("    capture_every: int = 1000  #", "    capture_every: int = 20  #"),
                     ("    measure_every: int = 100  #", "    measure_every: int = 20  #"),
                     ("    measure_sparse_every: int = 500  #", "    measure_sparse_every: int = 20  #"),
                     ('DEFAULT_PLUGINS = ["capture", "measures"]',
                      f'DEFAULT_PLUGINS = {json.dumps(["capture", "measures", *plugins])}')]:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    if edit:
        assert source.count(edit[0]) == 1, edit[0]
        source = source.replace(*edit)
    (folder / "experiment.py").write_text(source)
    shutil.copy(os.path.join(ROOT, "plot.py"), folder / "plot.py")
    shutil.copytree(os.path.join(ROOT, "lab"), folder / "lab", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    return folder


def harness_run_experiment(folder, run_num, timeout=7200):
    """What ai_scientist/perform_experiments.py's run_experiment does: (return code, its next prompt)."""
    shutil.copy(folder / "experiment.py", folder / f"run_{run_num}.py")
    result = subprocess.run([sys.executable, "experiment.py", f"--out_dir=run_{run_num}"], cwd=folder,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, timeout=timeout)
    if result.returncode != 0:
        shutil.rmtree(folder / f"run_{run_num}", ignore_errors=True)
        stderr = result.stderr if len(result.stderr) <= 1500 else "..." + result.stderr[-1500:]
        return result.returncode, f"Run failed with the following error {stderr}"
    results = {k: v["means"] for k, v in read_json(folder / f"run_{run_num}" / "final_info.json").items()}
    return 0, f"Run {run_num} completed. Here are the results:\n{results}"


def harness_run_plotting(folder, timeout=600):
    result = subprocess.run([sys.executable, "plot.py"], cwd=folder, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, timeout=timeout)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def idea_folder(tmp_path_factory):
    """A baseline run_0, then the harness's run 1 with the four example interventions switched on in
    DEFAULT_PLUGINS and nothing else, and its plotting step."""
    folder = tmp_path_factory.mktemp("idea")
    agent_copy(folder)
    assert harness_run_experiment(folder, 0)[0] == 0
    agent_copy(folder, EXAMPLES)
    (folder / "notes.txt").write_text(HARNESS_NOTES)
    code, prompt = harness_run_experiment(folder, 1)
    assert code == 0, prompt
    code, stderr = harness_run_plotting(folder)
    assert code == 0, stderr
    return folder, prompt


def test_harness_run_and_plot_succeed_and_notes_keep_the_harness_text(idea_folder):
    folder, prompt = idea_folder
    assert "step_val_acc_95_mean" in prompt and "step_val_acc_99_mean" in prompt
    notes = (folder / "notes.txt").read_text()
    assert notes.startswith(HARNESS_NOTES)
    block = notes[notes.index(R.NOTES_BEGIN):]
    assert block.rstrip().endswith(R.NOTES_END) and len(block) <= R.NOTES_LIMIT
    assert "[run_0] x_plus_y" in block and "[run_1] x_minus_y" in block
    named = [part.split("e.g. ")[-1].rstrip("]") for part in block.split("[")[1:] if "]" in part
             and part.split("]")[0].endswith((".png", ".gif"))]
    named = [n.split("]")[0] for n in named]
    assert named and all((folder / n).exists() for n in named), named
    pngs = [n for n in os.listdir(folder) if n.endswith(".png")]
    for prefix in {n.split("_")[0] for n in pngs}:  # every kind of figure at the root is described
        assert f"- {prefix}_" in block or (prefix in ("train", "val") and "{train,val}_" in block), prefix


def test_the_four_example_interventions_act(idea_folder):
    folder, _ = idea_folder
    base, run = read_json(folder / "run_0" / "final_info.json"), read_json(folder / "run_1" / "final_info.json")
    for op in ("x_plus_y", "x_minus_y"):
        assert base[op]["final_info_dict"]["final_train_loss"] != run[op]["final_info_dict"]["final_train_loss"]
        per_seed = run[op]["final_info_dict"]["step_val_acc_95"]
        reached = [s for s in per_seed if s is not None]
        assert run[op]["means"]["step_val_acc_95_n"] == len(reached)
        assert run[op]["means"]["step_val_acc_95_mean"] == (np.mean(reached) if reached else None)
        assert set(base[op]["means"]) == {f"{k}_mean" for k in TEMPLATE_KEYS}  # the template's keys only
        for seed, step_95 in enumerate(per_seed):  # each act as they say, not merely "something changed"
            base_log = [json.loads(x) for x in open(folder / "run_0" / f"{op}_{seed}" / "log.jsonl")]
            log = [json.loads(x) for x in open(folder / "run_1" / f"{op}_{seed}" / "log.jsonl")]
            assert step_95 == next((r["step"] for r in log if r["val_acc"] > 0.95), None)
            # layer_lr: the first parameter group (the embeddings, scale 0.5) is the one the log's lr reads
            assert [r["lr"] for r in log] == pytest.approx([0.5 * r["lr"] for r in base_log])


def test_example_plugins_init_param_groups_and_augmentation():
    cfg = E.Config(p=11, d_model=32)
    task = E.make_task("x_minus_y", 11)
    train_idx, val_idx = E.split_pairs(len(task.y), 0.5, 0)

    def fresh(plugin):
        torch.manual_seed(1337)
        model = E.build_model(cfg, task)
        run = make_run(cfg, "x_minus_y", task, train_idx, val_idx, model)
        plugin.init_model(run)
        return run

    default, xavier, again = fresh(E.Plugin()), fresh(E.XavierInit()), fresh(E.XavierInit())
    weight = "blocks.0.ffn.0.weight"
    w = dict(xavier.model.named_parameters())[weight]
    assert not torch.equal(w, dict(default.model.named_parameters())[weight])
    assert torch.equal(w, dict(again.model.named_parameters())[weight])  # seeded
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    groups = E.LayerLearningRates().param_groups(default)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(default.model.named_parameters())
    assert lr_of[id(named["token_embeddings.weight"])] == pytest.approx(0.5 * cfg.lr)
    assert lr_of[id(named["head.weight"])] == pytest.approx(2 * cfg.lr)
    assert lr_of[id(named["blocks.1.qkv.weight"])] == pytest.approx(cfg.lr) and len(lr_of) == len(named)
    swap = E.SwapOperands()
    swap.on_train_begin(default)
    x, y = task.x[train_idx], task.y[train_idx]  # 60 pairs
    new_x, new_y = swap.transform_batch(default, 1, x, y)
    swapped = (new_x[:, 0] != x[:, 0])
    assert 15 < swapped.sum() < 45 and torch.equal(new_x[swapped][:, [2, 1, 0, 3]], x[swapped])
    a, b = new_x[:, 0] - 2, new_x[:, 2] - 2
    assert torch.equal(new_y, (a - b) % 11)  # the answers follow the swap


VALIDATION_GUARD = '''
import torch
from experiment import Plugin


class Guard(Plugin):
    """Corrupts every training batch; records whether validation was ever transformed."""

    name = "guard"

    def on_train_begin(self, run):
        self.train_rows = {tuple(r) for r in run.task.x[run.train_idx].tolist()}
        self.ok = True

    def transform_batch(self, run, step, x, y):
        self.ok &= all(tuple(r) in self.train_rows for r in x.tolist())  # only training pairs come here
        return x, torch.zeros_like(y)

    def on_eval(self, run, step, metrics):
        _, val_acc, _ = run.evaluate(run.task.x[run.val_idx], run.task.y[run.val_idx])
        self.ok &= val_acc == metrics["val_acc"]  # the logged val accuracy is on the untouched validation pairs

    def on_train_end(self, run, final_info):
        final_info["validation_untouched"] = self.ok
'''


def test_validation_pairs_never_pass_through_transform_batch(tmp_path):
    (tmp_path / "guard.py").write_text(VALIDATION_GUARD)
    run_script("experiment.py", ["--out_dir=r", *TINY, "--plugins=guard.py", "--workers=1"], tmp_path)
    info = read_json(tmp_path / "r" / "final_info.json")
    for op in ("x_plus_y", "permutation"):
        assert info[op]["final_info_dict"]["validation_untouched"] == [True, True]
        assert info[op]["means"]["validation_untouched_mean"] == 1.0
        assert info[op]["final_info_dict"]["final_train_acc"] == [1.0, 1.0]  # it learnt the corrupted labels ...
        assert max(info[op]["final_info_dict"]["final_val_acc"]) < 0.5  # ... which validation does not share


def test_final_info_means_skip_none_and_nan_and_keep_text_per_seed():
    infos = [{**dict.fromkeys(TEMPLATE_KEYS, 1.0), "grokked": True, "mdl": m, "note": t, "never": None}
             for m, t in ((2.0, "a"), (None, "b"), (float("nan"), "c"), (4.0, "d"))]
    block = summarize(infos)
    assert block["means"]["mdl_mean"] == 3.0 and block["means"]["mdl_n"] == 2
    assert block["stderrs"]["mdl_stderr"] == pytest.approx(np.std([2.0, 4.0], ddof=1) / math.sqrt(2))
    assert "note_mean" not in block["means"] and block["final_info_dict"]["note"] == ["a", "b", "c", "d"]
    assert block["means"]["never_mean"] is None and block["means"]["never_n"] == 0
    assert block["means"]["final_val_acc_mean"] == 1.0 and "final_val_acc_n" not in block["means"]
    json.dumps(block, allow_nan=False)  # NaN never reaches the file


@pytest.mark.parametrize("edit, cause", [
    (("        if self.reached is None and metrics[\"val_acc\"] > 0.95:",
      "        if 1 / 0 or self.reached is None and metrics[\"val_acc\"] > 0.95:"), "ZeroDivisionError"),
    (("        return self.head(self.norm(h[:, -1]))  # (batch, n_classes)",
      "        return self.head(self.norm(h[:, -1, :7]))  # (batch, n_classes)"), "RuntimeError"),
])
def test_an_edit_that_raises_leaves_its_cause_in_the_last_1500_characters(tmp_path, edit, cause):
    folder = agent_copy(tmp_path / "idea", ["step_val_acc_95"], edit, workers=0)  # the cause crosses the pool
    code, prompt = harness_run_experiment(folder, 1)
    assert code != 0 and not (folder / "run_1").exists()
    tail = prompt[-1500:]
    last = prompt.strip().splitlines()[-1]  # the cause in one line, the last: what survives any truncation
    assert cause in last and "experiment.py" in last and "line " in last, tail
    assert "Traceback" not in tail and "step 0/" not in tail and "done in" not in tail


def test_plot_survives_runs_an_agent_changed(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run_0")
    folder = tmp_path / "run_0"
    info = read_json(folder / "final_info_x_plus_y_0.json")
    info["step_val_acc_99"] = None  # a None where a number was
    (folder / "final_info_x_plus_y_0.json").write_text(json.dumps(info))
    with open(folder / "x_plus_y_1" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 70, "train_acc": None, "val_acc": 0.5, "train_loss": None}) + "\n")
    log = [json.loads(line) for line in open(folder / "permutation_0" / "log.jsonl")]
    with open(folder / "permutation_0" / "log.jsonl", "w") as f:  # an older schema: no loss columns
        f.writelines(json.dumps({k: r[k] for k in ("step", "train_acc", "val_acc")}) + "\n" for r in log)
    index = read_json(folder / "permutation_1" / "activations" / "index.json")
    del index["modules"]
    (folder / "permutation_1" / "activations" / "index.json").write_text(json.dumps(index))
    proc = run_script("plot.py", ["--no_tsne"], tmp_path)
    assert proc.returncode == 0 and "warning" in proc.stderr
    for name in ("val_acc_x_plus_y.png", "train_loss_permutation.png", "analysis_summary.md", "leadlag.csv",
                 "pca_run_0_x_plus_y_last.png", "notes.txt"):
        assert (tmp_path / name).exists(), name


def test_notes_block_is_replaced_and_every_other_byte_kept(tmp_path):
    path = str(tmp_path / "notes.txt")
    R.update_notes(path, f"{R.NOTES_BEGIN}\none\n{R.NOTES_END}\n")  # created
    assert open(path).read() == f"{R.NOTES_BEGIN}\none\n{R.NOTES_END}\n"
    before, after = "# Title: x\r\nmine, no newline at the end", "\n## Run 2: mine too\n"
    with open(path, "w", newline="") as f:
        f.write(before)
    R.update_notes(path, f"{R.NOTES_BEGIN}\ntwo\n{R.NOTES_END}\n")  # appended
    text = open(path, newline="").read()
    assert text.startswith(before) and text.endswith(f"{R.NOTES_BEGIN}\ntwo\n{R.NOTES_END}\n")
    with open(path, "a", newline="") as f:
        f.write(after)
    R.update_notes(path, f"{R.NOTES_BEGIN}\nthree\n{R.NOTES_END}\n")  # replaced in place
    text = open(path, newline="").read()
    assert text == before + "\n\n" + f"{R.NOTES_BEGIN}\nthree\n{R.NOTES_END}\n" + after
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


def test_findings_block_fits_a_prompt_for_six_runs_of_four_ops():
    from test_leadlag import pair, sigmoid, wiggle

    by_op, rows_by, leadlag, figures = {}, {}, [], []
    for op in E.Config().ops:  # the template's four
        for r in range(6):
            run = f"run_{r}"
            pairs = []
            for seed in range(3):
                p = pair(seed, 2500 + 300 * seed)
                p.run, p.op = run, op
                pairs.append(p)
            rows = [{"run": run, "op": op, "seed": p.seed, "layer": layer, "split": "val", "metric": metric,
                     "step": s, "value": float(sigmoid(s, 2500 + 300 * p.seed + shift, 100) + wiggle(s))}
                    for p in pairs for layer in ("first", "last") for shift, metric in
                    ((-500, "silhouette"), (-300, "knn_acc"), (200, "davies_bouldin"), (400, "ncc_acc"))
                    for s in range(0, 6001, 100)]
            by_op.setdefault(op, {})[run] = pairs
            rows_by[(run, op)] = rows
            leadlag += A.leadlag_rows(pairs, rows)[0]
            figures += [(f"pca_{run}_{op}_{layer}.png", "") for layer in ("first", "last")]
    block = R.findings_block(by_op, {f"run_{r}": f"run_{r}" for r in range(6)}, rows_by, leadlag, figures)
    assert len(block) <= R.NOTES_LIMIT and block.count("\n[") == 24
    assert "analysis_summary.md" in block and "pca_{run}_{op}_{layer}.png" in block
    assert "Onset leads (steps, interval > 0, 3 seeds): silhouette (first, val) [reads val labels] 533 [400, 600]" in block


def test_snapshots_and_every_output_are_readable_by_the_group(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in [*tiny_run.glob("x_plus_y_0/activations/*.safetensors"), tiny_run / "x_plus_y_0" / "model.safetensors",
                 tiny_run / "final_info.json", tiny_run / "x_plus_y_0" / "examples.parquet"]:
        assert os.stat(path).st_mode & 0o777 == expected, path


HOLD = '''
import os, time
from experiment import Plugin


class Hold(Plugin):
    """Holds x_plus_y seed 0 at its first step while the file "hold" exists, after writing "held"."""
    name = "hold"

    def on_step_end(self, run, step):
        if (run.op, run.seed) == ("x_plus_y", 0):
            open(os.path.join(FOLDER, "held"), "w").close()
            while os.path.exists(os.path.join(FOLDER, "hold")):
                time.sleep(0.05)
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_one_writer_per_out_dir_and_kill_9_leaves_no_lock(tmp_path, workers):
    """With 2 workers the held job trains in a child, which must not keep the lock once the parent is killed."""
    import fcntl

    (tmp_path / "hold.py").write_text(f"FOLDER = {str(tmp_path)!r}\n" + HOLD)
    (tmp_path / "hold").touch()
    args = [sys.executable, os.path.join(ROOT, "experiment.py"), "--out_dir=r", *TINY, "--plugins=hold.py",
            f"--workers={workers}", "--progress=none"]
    first = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: (tmp_path / "held").exists(), 120, 0.1)
    others = 3 if workers == 2 else 0  # TINY's other 3 jobs, which the other worker trains meanwhile
    assert wait_until(lambda: len(list((tmp_path / "r").glob("final_info_*.json"))) == others, 120)
    listing = sorted((str(p), p.stat().st_mtime_ns) for p in (tmp_path / "r").rglob("*"))
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
    assert "being written by another experiment.py" in second.stderr and str(first.pid) in second.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in (tmp_path / "r").rglob("*")) == listing  # touched nothing
    children = [int(c) for c in open(f"/proc/{first.pid}/task/{first.pid}/children").read().split()
                if b"resource_tracker" not in open(f"/proc/{c}/cmdline", "rb").read()]
    assert len(children) == workers - 1
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    with open(tmp_path / "r" / ".lock") as lock:  # free at once, while the held child (if any) still runs
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (tmp_path / "hold").unlink()
    assert wait_until(lambda: all(exited(c) for c in children), 60, 0.1)
    third = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
