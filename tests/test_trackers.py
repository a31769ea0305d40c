"""The trackers (--tracker, lab/trackers.py): TensorBoard event files read back with TensorBoard's own
EventAccumulator equal log.jsonl, measures.jsonl and final_info; a wandb offline run (no network) holds the same
rows and final_info as its summary, grouped by run folder and sweep cell; a tracker that cannot work says so in one
line and leaves the results byte-identical to an untracked run's."""
import glob
import json
import os
import struct

import pytest

from conftest import read_json, run_script

SMALL = ["--ops=x_plus_y", "--seeds=1", "--steps=40", "--p=11", "--d_model=16", "--batch_size=64", "--workers=1",
         "--capture_every=20", "--measure_every=10", "--measure_sparse_every=10", "--plugins=norms"]
RESULTS = ["log.jsonl", "measures.jsonl", "model.safetensors", "examples.parquet"]  # a job's result files


def rows(path):
    return [json.loads(line) for line in open(path)]


def flat(values: dict, prefix: str) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}/{key}"))
        else:
            out[f"{prefix}/{key}"] = value
    return out


def test_tensorboard_events_equal_the_jsonl_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("experiment.py", ["--out_dir=r", *SMALL, "--tracker=tensorboard"], tmp_path)
    job = tmp_path / "r" / "x_plus_y_0"
    events = EventAccumulator(str(job), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    log = rows(job / "log.jsonl")
    assert len(log) == 4 and "grad_norm" in log[-1]  # the norms plugin's keys are in the log row
    for key in log[0]:
        if key != "step":
            assert series(f"log/{key}") == pytest.approx({r["step"]: r[key] for r in log}, rel=1e-6), key
    measured = rows(job / "measures.jsonl")
    assert [r["step"] for r in measured] == [0, 10, 20, 30, 40]
    for r in measured:
        for tag, value in flat(r["values"], "measures").items():
            assert series(tag)[r["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, r["step"])
    final = read_json(tmp_path / "r" / "final_info_x_plus_y_0.json")
    for key, value in final.items():
        if not isinstance(value, bool):
            assert list(series(f"final/{key}").values()) == pytest.approx([value], rel=1e-6), key
    assert all(t.startswith(("log/", "measures/", "final/", "hparams/")) for t in tags), tags
    run_script("plot.py", ["--runs=r", "--no_tsne", "--notes="], tmp_path)  # its figures go to <run>/plots
    plots = EventAccumulator(str(tmp_path / "r" / "plots"), size_guidance={"images": 0})
    plots.Reload()
    drawn = {p.stem for p in tmp_path.glob("*.png")}
    assert "val_acc_x_plus_y" in drawn and set(plots.Tags()["images"]) == drawn


def wandb_records(path: str):
    """The records of a .wandb file (LevelDB log framing: 32 KiB blocks of [crc32, length, type] chunks) as wandb's
    own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_runs_hold_the_rows_and_final_info_grouped_by_cell(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens: any attempt at the network fails
    env = {"WANDB_MODE": "", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "WANDB_BASE_URL": dead, "WANDB_API_KEY": ""}
    env = {k: v for k, v in env.items() if v} | {"WANDB_DISABLE_GIT": "true"}
    os.environ.pop("WANDB_MODE", None)
    run_script("experiment.py", ["--out_dir=r", *SMALL, "--tracker=wandb", "--sweep=train_frac=0.4,0.6"], tmp_path,
               env=env)
    found = {}
    for path in glob.glob(str(tmp_path / "r" / "wandb" / "offline-run-*" / "run-*.wandb")):
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in r.summary.update})
        found[run.run_group] = (run.display_name, history, summary)
    assert sorted(found) == ["r/train_frac=0.4", "r/train_frac=0.6"]
    for group, (name, history, summary) in found.items():
        cell = group.split("/")[1]
        assert name == f"x_plus_y_0__{cell}"
        log = rows(tmp_path / "r" / cell / "x_plus_y_0" / "log.jsonl")
        logged = [h for h in history if "log/val_acc" in h]
        assert [h["_step"] for h in logged] == [r["step"] for r in log]
        for h, r in zip(logged, log):
            assert {k[4:]: v for k, v in h.items() if k.startswith("log/")} == {k: v for k, v in r.items() if k != "step"}
        final = read_json(tmp_path / "r" / cell / "final_info_x_plus_y_0.json")
        assert {k: summary[k] for k in final} == final


def test_a_tracker_that_cannot_work_says_so_and_changes_no_result(tmp_path):
    shim = tmp_path / "shim"  # a wandb and a tensorboard that cannot be imported
    for name in ("wandb", "tensorboard"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    run_script("experiment.py", ["--out_dir=plain", *SMALL], tmp_path)
    proc = run_script("experiment.py", ["--out_dir=tracked", *SMALL, "--tracker=tensorboard,wandb"], tmp_path,
                      env={"PYTHONPATH": str(shim)})
    said = [line for line in proc.stderr.splitlines() if "tracker off" in line]
    assert len(said) == 2 and all("the JSONL results are unaffected" in line for line in said), proc.stderr
    for name in RESULTS:
        assert (tmp_path / "tracked" / "x_plus_y_0" / name).read_bytes() == \
            (tmp_path / "plain" / "x_plus_y_0" / name).read_bytes(), name
    assert read_json(tmp_path / "tracked" / "final_info.json") == read_json(tmp_path / "plain" / "final_info.json")
    assert not glob.glob(str(tmp_path / "tracked" / "x_plus_y_0" / "events.out.tfevents.*"))


def test_an_unknown_tracker_is_one_line_before_any_file(tmp_path):
    proc = run_script("experiment.py", ["--out_dir=r", "--tracker=tensorboard,mlflow"], tmp_path, check=False)
    assert proc.returncode == 2 and "--tracker=tensorboard,mlflow" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
