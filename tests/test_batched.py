"""Batched training (lab/batched.py) against the sequential path: the same losses to float tolerance, the same
grokking outcome, no model's numbers depending on another's, every file a sequential run writes, resume of a
killed batch, and the refusals (a plugin written for one model, an edited step)."""
import dataclasses
import importlib.util
import json
import os
import subprocess

import pytest
import torch

import experiment as E
from conftest import TINY, kill_when, read_json, run_script, start_experiment
from lab import batched
from lab.schema import Job

# Losses of the first 50 updates agree to rtol 1e-5: float32 carries 7 digits; a batched matrix multiply sums in
# another order than a single one (a few units in the last place per operation), and 50 Adam updates carry that
# over. Measured: 1e-7 relative after 300 updates (p=31, d_model=64), so the bound has a 100x margin, and a real
# difference (another batch order, a gradient leaking between models) moves losses by 1e-3 and more.
RTOL, ATOL = 1e-5, 1e-6
SMALL = dict(p=11, d_model=32, batch_size=64, steps=50, eval_every=1, warmup_steps=10, capture=False, measure=False,
             workers=1)
VARIED = (("lr", 0.002), ("weight_decay", 0.1), ("train_frac", 0.6), ("init_scale", 0.8))  # one per model


def train_both(tmp_path, jobs, **fields):
    """(batched logs, sequential logs) of jobs: one log (list of rows) per job."""
    logs = {}
    for mode in ("batched", "sequential"):
        cfg = E.Config(out_dir=str(tmp_path / mode), **{**SMALL, **fields})
        if mode == "batched":
            batched.train_group(E, cfg, jobs)
        else:
            for job in jobs:
                E.train_one(cfg, job)
        logs[mode] = [[json.loads(line) for line in open(os.path.join(E.job_dir(cfg.out_dir, job), "log.jsonl"))]
                      for job in jobs]
    return logs["batched"], logs["sequential"]


def test_batched_losses_match_sequential_for_50_updates_with_per_model_hyperparameters(tmp_path):
    jobs = [Job("x_plus_y", 0), Job("x_plus_y", 1, (VARIED[0],)), Job("x_minus_y", 2, (VARIED[1],)),
            Job("x_plus_y", 0, (VARIED[2],)), Job("x_plus_y", 3, (VARIED[3],))]
    together, alone = train_both(tmp_path, jobs)
    for job, a, b in zip(jobs, together, alone):
        assert len(a) == len(b) == 50
        for key in ("train_loss", "val_loss", "lr"):
            got, want = torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b])
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"{key} of {job}")
        first, last = (sum(r["train_loss"] for r in rows) / 10 for rows in (a[:10], a[-10:]))
        assert last < 0.98 * first  # they learned (a mean over 10 batches of 64): 2% is 2000x the tolerance
    finals = [row[-1]["train_loss"] for row in together]
    assert len({round(v, 4) for v in finals}) == len(finals)  # and each with its own data and hyperparameters


@pytest.mark.parametrize("optimizer", ["adam", "perp_adamw"])
def test_the_other_batched_optimizers_match_theirs(tmp_path, optimizer):
    jobs = [Job("x_plus_y", 0), Job("x_plus_y", 1, (VARIED[1],))]
    together, alone = train_both(tmp_path, jobs, optimizer=optimizer, steps=20)
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.tensor([r["train_loss"] for r in a]),
                                   torch.tensor([r["train_loss"] for r in b]), rtol=RTOL, atol=ATOL)


def test_a_models_gradient_does_not_depend_on_the_others_in_the_batch():
    cfg = E.Config(**{**SMALL, "d_model": 32})
    task = E.task_of(cfg, "x_plus_y")
    torch.manual_seed(0)
    stack = batched.Stack([E.build_model(cfg, task) for _ in range(3)])
    x = task.x[torch.randint(len(task.y), (3, 64))]
    y = task.y[torch.randint(len(task.y), (3, 64))]

    def grads(x, y):
        torch.func.vmap(E.LOSSES["cross_entropy"])(stack(x), y).sum().backward()
        out = {name: p.grad.clone() for name, p in stack.params.items()}
        for p in stack.params.values():
            p.grad = None
        return out

    before = grads(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[1] = task.x[torch.randint(len(task.y), (64,))]  # model 1 gets other data
    y2[1] = (y2[1] + 1) % task.n_classes
    after = grads(x2, y2)
    for name in before:
        assert torch.equal(before[name][[0, 2]], after[name][[0, 2]]), name  # exactly: not a bit moves
    assert all(not torch.equal(before[name][1], after[name][1]) for name in before if "head" in name)


def test_a_job_trains_to_the_same_numbers_whatever_else_is_in_its_batch(tmp_path):
    cfg = E.Config(out_dir=str(tmp_path / "a"), **{**SMALL, "steps": 30, "eval_every": 10})
    batched.train_group(E, cfg, [Job("x_plus_y", 0), Job("x_plus_y", 1), Job("x_plus_y", 2)])
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    batched.train_group(E, other, [Job("x_plus_y", 0), Job("x_plus_y", 5), Job("x_plus_y", 2)])
    for seed in (0, 2):
        for name in ("log.jsonl", "model.safetensors"):
            assert (tmp_path / "a" / f"x_plus_y_{seed}" / name).read_bytes() == \
                (tmp_path / "b" / f"x_plus_y_{seed}" / name).read_bytes()
    assert (tmp_path / "a" / "x_plus_y_1" / "log.jsonl").read_bytes() != \
        (tmp_path / "b" / "x_plus_y_5" / "log.jsonl").read_bytes()


def test_finished_jobs_retrain_as_ghosts_so_a_resumed_batch_keeps_its_models_and_writes_only_its_own(tmp_path):
    """On CUDA a resumed batch takes its finished jobs along as ghosts (batched.resume_units): trained again,
    written nowhere. Checked here on the CPU: the others' bytes, the finished job's files untouched."""
    jobs = [Job("x_plus_y", 0), Job("x_plus_y", 1), Job("x_plus_y", 2)]
    cfg = E.Config(out_dir=str(tmp_path / "a"), **{**SMALL, "steps": 30, "eval_every": 10})
    batched.train_group(E, cfg, jobs)
    resumed = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))  # as killed after job 0 was written
    batched.train_group(E, resumed, jobs[:1])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    records = batched.train_group(E, resumed, jobs, ghosts=(jobs[0],))
    assert [(r["op"], r["seed"]) for r in records] == [("x_plus_y", 1), ("x_plus_y", 2)]
    assert all(r["batch"]["models"] == 3 for r in records)
    for path, (mtime, data) in before.items():  # the finished job: not one file rewritten
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    for seed in (1, 2):
        for name in ("log.jsonl", "model.safetensors"):
            assert (tmp_path / "b" / f"x_plus_y_{seed}" / name).read_bytes() == \
                (tmp_path / "a" / f"x_plus_y_{seed}" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_a_resumed_batch_takes_its_finished_jobs_along_on_cuda_only():
    a, b, c, d = (Job("x_plus_y", seed) for seed in range(4))
    units = [batched.Unit((a, b, c), True), batched.Unit((d,), False)]
    on_cuda = batched.resume_units(units, [b, c, d], "cuda")
    assert on_cuda == [batched.Unit((a, b, c), True, (a,)), batched.Unit((d,), False)]
    assert batched.resume_units(units, [b, c, d], "cpu") == [batched.Unit((b, c), True), batched.Unit((d,), False)]
    assert batched.resume_units(units, [d], "cuda") == [batched.Unit((d,), False)]  # a finished batch stays done
    assert batched.resume_units(units, [a, b, c, d], "cuda") == units  # a fresh run: the plan as it is


def test_a_batched_model_reaches_the_grokking_outcome_of_the_sequential_run(tmp_path):
    """tests/test_science.py's grokking config groks before step WINDOW_START one by one (asserted there); trained
    by train_group (a batch of one: vmap, BatchedAdam; independence of models is tested exactly above) it groks
    before it too, and stops there, leaving its batch."""
    from test_science import GROKS, WINDOW_START

    args = [*GROKS, "--stop_at_val_acc=0.99", "--measure=false", "--batched=on", "--progress=lines"]
    proc = run_script("experiment.py", ["--out_dir=run_on", *args], tmp_path, timeout=900)
    assert "(1 of them in 1 batches" in proc.stderr, proc.stderr
    info = read_json(tmp_path / "run_on" / "final_info.json")["x_plus_y"]["final_info_dict"]
    assert info["grokked"] == [True] and info["step_val_acc_99"][0] < WINDOW_START, info
    assert info["final_val_acc"][0] > 0.99
    log = [json.loads(line) for line in open(tmp_path / "run_on" / "x_plus_y_0" / "log.jsonl")]
    assert log[0]["val_acc"] < 0.1 and log[-1]["step"] == info["step_val_acc_99"][0]  # it stopped there
    names = {p.name for p in (tmp_path / "run_on" / "x_plus_y_0").iterdir()}
    assert names == {"activations", "examples.parquet", "log.jsonl", "model.safetensors", "run.json"}
    assert read_json(tmp_path / "run_on" / "x_plus_y_0" / "run.json")["batch"] == {"index": 0, "models": 1}


def test_a_plugin_written_for_one_model_makes_its_jobs_train_one_by_one(tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text("import experiment\n\nclass Mine(experiment.Plugin):\n    name = 'mine'\n\n"
                      "    def on_eval(self, run, step, metrics):\n        metrics['mine'] = step\n")
    proc = run_script("experiment.py", ["--out_dir=r", *TINY, "--ops=x_plus_y", f"--plugins={plugin}",
                                        "--batched=on"], tmp_path)
    said = [line for line in proc.stderr.splitlines() if line.startswith("batched training: off")]
    assert len(said) == 1 and "plugin mine is written for one model" in said[0], proc.stderr
    assert "(0 of them in 0 batches" in proc.stderr
    assert json.loads((tmp_path / "r" / "x_plus_y_1" / "log.jsonl").read_text().splitlines()[0])["mine"] == 10


def test_stacked_update_mirrors_make_update_in_experiment_py():
    """lab/batched.py's StackedUpdate copies make_update's step and the optimizers' arithmetic (the loop is shared,
    lab/loop.py): when they change, this fails, so that whoever changes them updates StackedUpdate (and then
    MIRRORED). Until then such jobs train one by one."""
    assert batched.mirrored_sources(E) == batched.MIRRORED
    assert batched.why_not(E, E.Config()) is None


def test_an_edited_step_trains_one_by_one(monkeypatch):
    monkeypatch.setitem(batched.MIRRORED, "make_update", "edited")
    assert "make_update or train_one differs from what lab/batched.py mirrors" in batched.why_not(E, E.Config())
    monkeypatch.setitem(batched.MIRRORED, "make_update", batched.mirrored_sources(E)["make_update"])
    monkeypatch.setitem(batched.MIRRORED, "adam", "edited")
    assert batched.why_not(E, E.Config()) is None  # another optimizer's change does not matter to adamw's jobs
    assert "adam differs" in batched.why_not(E, E.Config(optimizer="adam"))


def test_a_comment_or_a_docstring_does_not_change_the_fingerprint_and_code_does(tmp_path):
    sources = {"a": 'def f(x):\n    """What f does."""\n    return x + 1  # one more\n',
               "b": "def f(x):\n    # a comment\n\n    return x + 1\n",
               "c": "def f(x):\n    return x + 2\n"}
    prints = {}
    for name, text in sources.items():
        path = tmp_path / f"mod_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"mod_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        prints[name] = batched.fingerprint([module.f])
    assert prints["a"] == prints["b"] != prints["c"]


def test_a_killed_batch_resumes_to_the_uninterrupted_results(tmp_path):
    args = [*TINY, "--ops=x_plus_y", "--seeds=3", "--steps=200", "--capture_every=100", "--batched=on"]
    run_script("experiment.py", ["--out_dir=clean", *args], tmp_path)
    proc = start_experiment(["--out_dir=killed", *args], tmp_path, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "x_plus_y_2" / "log.jsonl"  # written every 100 steps: the batch is under way
    kill_when(proc, log)
    assert log.exists() and not (tmp_path / "killed" / "final_info.json").exists()
    run_script("experiment.py", ["--out_dir=killed", *args], tmp_path)
    for seed in range(3):
        for path in (f"x_plus_y_{seed}/log.jsonl", f"x_plus_y_{seed}/model.safetensors",
                     f"final_info_x_plus_y_{seed}.json"):
            assert (tmp_path / "killed" / path).read_bytes() == (tmp_path / "clean" / path).read_bytes(), path


def test_plan_batches_same_shapes_per_worker_and_auto_is_a_rule_per_device(tmp_path):
    cfg = E.Config(out_dir=str(tmp_path), ops=("x_plus_y", "x_minus_y", "permutation"), seeds=3, batched="on",
                   device="cpu", sweep="lr=0.001,0.002")
    jobs = [Job(op, seed, cell) for cell in ((("lr", 0.001),), (("lr", 0.002),)) for op in cfg.ops
            for seed in range(3)]
    units = batched.plan(E, cfg, jobs, workers=2, say=print)
    assert all(unit.batched for unit in units)
    assert sorted(map(len, units)) == [3, 3, 6, 6]  # x+y and x-y share a shape (12 jobs), S3 has its own (6)
    assert {job.op for unit in units for job in unit.jobs if len(unit) == 3} == {"permutation"}
    auto = dataclasses.replace(cfg, batched="auto")
    assert batched.AUTO == {"cuda": True, "cpu": False}
    assert not any(unit.batched for unit in batched.plan(E, auto, jobs, workers=2, say=print))
    said = []
    grokfast = dataclasses.replace(cfg, plugins=("grokfast",))
    assert not any(u.batched for u in batched.plan(E, grokfast, jobs, workers=2, say=said.append))
    assert len(said) == 1 and "grokfast is written for one model" in said[0]


def test_one_by_one_and_batched_stop_and_checkpoint_alike(tmp_path):
    """One loop (lab/loop.py): a model that stops early writes no checkpoint of its stopping step, in a batch as
    alone; the one still training keeps its checkpoints."""
    jobs = [Job("x_plus_y", 0), Job("x_plus_y", 1, (("stop_at_val_acc", 2.0),))]  # the second never stops
    found = {}
    for mode in ("batched", "sequential"):
        cfg = E.Config(out_dir=str(tmp_path / mode), **{**SMALL, "steps": 30, "eval_every": 10,
                                                         "checkpoint_every": 10, "stop_at_val_acc": -1.0})
        if mode == "batched":
            batched.train_group(E, cfg, jobs)
        else:
            for job in jobs:
                E.train_one(cfg, job)
        found[mode] = [sorted(os.listdir(os.path.join(E.job_dir(cfg.out_dir, job), "checkpoints")))
                       if os.path.isdir(os.path.join(E.job_dir(cfg.out_dir, job), "checkpoints")) else []
                       for job in jobs]
    assert found["batched"] == found["sequential"]
    assert found["sequential"][0] == [] and len(found["sequential"][1]) == 3
