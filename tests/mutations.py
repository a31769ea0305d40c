"""Mutation check: put one deliberate bug at a time into a copy of the code and run the tests that should catch it.

    python tests/mutations.py                 # every mutation below; prints caught / SURVIVED per mutation
    python tests/mutations.py --only 3,7      # some of them

Each mutation is (file, the exact text it replaces, its replacement, what the bug means[, the tests that should
catch it: TESTS otherwise; --tests replaces both]). The copy is a temporary
folder (lab/, tests/, experiment.py, plot.py), so the work tree is never touched; a mutation whose text is not
found is reported as such (the code moved on: update the list). Exit code 1 when any mutation survives.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_earlywarning.py", "tests/test_leadlag.py"]  # a mutation's tests unless it names its own
RULES_TESTS = ["tests/test_rules.py"]
PRESET_TESTS = ["tests/test_presets.py"]
MEASURES_TESTS = ["tests/test_measures.py"]

MUTATIONS = [
    ("lab/earlywarning.py", "[([r for r in runs if getattr(r, by) != n],", "[(list(runs),",
     "leave-one-cell-out dropped: every fold is fitted on every run"),
    ("lab/earlywarning.py", 'return "false alarm" if alarm is not None and alarm <= window else "quiet"',
     'return "false alarm" if alarm is not None else "quiet"', "the false-alarm window ignored"),
    ("lab/earlywarning.py", 'return "hit" if alarm is not None and alarm < run.t50 else "miss"',
     'return "hit" if alarm is not None and alarm <= run.t50 else "miss"', "a hit at the half step itself (<=)"),
    ("lab/onset.py", "first_run(side * z > 1)", "first_run(side * z >= 1)", "an onset at the band's edge (>=)"),
    ("lab/earlywarning.py", 'i = int(np.searchsorted(peak, level, side="right"))',
     'i = int(np.searchsorted(peak, level, side="left"))', "an alarm at exactly the level (>= for >)"),
    ("lab/onset.py", "RUN = 5  #", "RUN = 3  #", "a shorter run: noise makes onsets"),
    ("lab/onset.py", "BAND = 8  #", "BAND = 4  #", "a shorter band"),
    ("lab/onset.py", "return (rest - (low + high) / 2) / ((high - low) / 2)",
     "return (rest - low) / ((high - low) / 2)", "deviation from the band's low end, not its midpoint"),
    ("lab/onset.py", 'at = np.searchsorted(steps, np.asarray(grid, dtype=float), side="right") - 1',
     'at = np.searchsorted(steps, np.asarray(grid, dtype=float), side="left") - 1',
     "grid values read one measurement early"),
    ("lab/stats.py", "return float((earlier & higher).sum() + 0.5 * (earlier & ties).sum())",
     "return float((earlier & higher).sum())", "tied scores count nothing, not half"),
    ("lab/stats.py", "earlier = (times[:, None] < times[None, :]) & events[:, None]",
     "earlier = times[:, None] < times[None, :]", "censoring ignored: a censored run forms pairs as if grokked"),
    ("lab/stats.py", "centre = (p + z * z / (2 * n)) / (1 + z * z / n)", "centre = p",
     "a Wald-centred interval, not Wilson's"),
    ("lab/stats.py", "xs.append(x - x.mean())\n            ys.append(y - y.mean())",
     "xs.append(x)\n            ys.append(y)", "the clock slope without group fixed effects"),
    ("lab/earlywarning.py", "mine = [r for r in runs if r.stratum == stratum and at_risk(r, offset)]",
     "mine = [r for r in runs if at_risk(r, offset)]", "concordance pairs across cells (not stratified)"),
    ("lab/earlywarning.py", "return run.t50 is None or run.t50 > offset", "return True",
     "runs past val acc 0.5 at the offset kept in the concordance"),
    ("lab/earlywarning.py", "return [r for r in runs if r.stratum == run.stratum and r is not run]",
     "return [r for r in runs if r.stratum == run.stratum]", "the config lookup reads the run's own outcome"),
    ("lab/earlywarning.py", "_stratum_counts(rule, train, runs, offset, 1).values())) < 0.5 else 1",
     "_stratum_counts(rule, train, runs, offset, 1).values())) < -1 else 1", "the concordance's direction not fitted"),
    ("lab/earlywarning.py", "_stratum_counts(rule, train, runs, offset, 1).values())) < 0.5 else 1",
     "_stratum_counts(rule, held, runs, offset, 1).values())) < 0.5 else 1",
     "the concordance's direction fitted on the held-out cell"),
    ("lab/earlywarning.py", "return max(times) if times else None", "return min(times) if times else None",
     "the horizon is the shortest time to 0.5, not the longest"),
    ("lab/earlywarning.py", "if self.rising or horizon is None or self.span < horizon:",
     "if horizon is None or self.span < horizon:", "runs rising at the budget count as negatives"),
    ("lab/earlywarning.py", "self.half_step <= self.grid[onset.BAND - 1]", "self.half_step < 0",
     "runs that reach 0.5 inside the band are kept"),
    ("lab/earlywarning.py", "for sign in (1, -1):\n            for level in LEVELS:",
     "for sign in (1,):\n            for level in LEVELS:", "alarms fitted in one direction only"),
    ("lab/earlywarning.py", 'return "coupled" if low > 0 else "opposite" if high < 0 else "clock" if high < 1',
     'return "coupled" if low > -1 else "opposite" if high < 0 else "clock" if high < 1',
     "the clock verdict's bounds"),
    ("lab/earlywarning.py", "if not rule.reads_run(run):", "if False:",
     "runs without the measure (RQI of x-y) judged as quiet"),
    ("lab/earlywarning.py", "by_cell.setdefault(run.stratum, []).append(val[0] - mine[0])",
     "by_cell.setdefault(run.stratum, []).append(mine[0] - val[0])", "the onset lead's sign (sweeps)"),
    ("lab/analysis.py", '"onset_lead": None if began is None or val_onset is None else val_onset[0] - began[0],',
     '"onset_lead": None if began is None or val_onset is None else began[0] - val_onset[0],',
     "the onset lead's sign (lead-lag)"),
    ("lab/analysis.py", 'leaders = [t for t in usable if t["n"] >= 2 and t["lead_lo"] > 0]',
     'leaders = [t for t in usable if t["n"] >= 2 and t["lead_mean"] > 0]',
     "a leader named by its mean, not its interval"),
    ("lab/stats.py", "low, high = np.percentile(values, [2.5, 97.5])", "low, high = np.percentile(values, [25, 75])",
     "a 50% interval called 95%"),
    ("lab/earlywarning.py", "rising = chance is not None and tail > CHANCE_TIMES * chance",
     "rising = chance is not None and tail > chance", "a run at chance at the budget counted as rising"),
    ("lab/earlywarning.py", 'first = onset.BAND if scale == "band" else 0', "first = onset.BAND",
     "value alarms read from the band's end, not from memorisation"),
    ("lab/schema.py", '"restricted_loss": "val_labels"', '"restricted_loss": "inputs"',
     "restricted loss (a loss on every pair) declared label-free"),
    ("lab/earlywarning.py", 'if t["measure"] in clock_of', 'if False',
     "the notes rank a predictor without its clock verdict"),
    ("lab/analysis.py", "return half_step is not None and band_end is not None and half_step <= band_end",
     "return False", "a seed half-way inside its band timed by onsets"),
    ("lab/rules.py", 'entry.update(direction="up" if fitted["sign"] > 0 else "down"',
     'entry.update(direction="up" if fitted["sign"] < 0 else "down"', "a rule written with the opposite direction",
     RULES_TESTS),
    ("lab/rules.py", 'return Measure(key).alarm(run, {"sign": 1 if rule["direction"] == "up" else -1',
     'return Measure(key).alarm(run, {"sign": 1 if rule["direction"] == "down" else -1',
     "a rule read with the opposite direction", RULES_TESTS),
    ("lab/rules.py", 'if rules["version"] != VERSION:', "if False:", "a file of another version read", RULES_TESTS),
    ("lab/rules.py", 'if rules.get("constants") != constants():', "if False:",
     "a file fitted under other constants read", RULES_TESTS),
    ("lab/rules.py", "job = TrainedJob(\"\", run.op, run.seed, run.out_dir, [*run.history, metrics], None)",
     "job = TrainedJob(\"\", run.op, run.seed, run.out_dir, run.history, None)",
     "the live plugin reads the log without this step's row", RULES_TESTS),
    ("lab/rules.py", "return {\"quiet\": \"correct rejection\", None: run.status(window)}.get(judged, judged)",
     "return {\"quiet\": \"correct rejection\", None: \"censored\"}.get(judged, judged)",
     "an excluded run applied as censored", RULES_TESTS),
    ("lab/rules.py", 'row["lead"] = int(run.half_step - row["alarm_step"])',
     'row["lead"] = int(row["alarm_step"] - run.half_step)', "the applied lead's sign", RULES_TESTS),
    ("lab/measures.py", "alphas = [hill_alpha(torch.linalg.svdvals(p.detach().double()) ** 2)",
     "alphas = [hill_alpha(torch.linalg.svdvals(p.detach().double()))",
     "weight_alpha on singular values, not eigenvalues of W^T W", MEASURES_TESTS),
    ("lab/measures.py", "return (2 * torch.fft.rfft(residual)[1: bins + 1]",
     "return (2 * torch.fft.rfft(residual)[0: bins]", "loss_lowfreq counts the zero frequency", MEASURES_TESTS),
    ("lab/measures.py", "residual = x - design @ torch.linalg.lstsq(design, x[:, None]).solution[:, 0]",
     "residual = x - x.mean()", "loss_lowfreq without its trend removed", MEASURES_TESTS),
    ("lab/rules.py", 'warn_run(pair, f"{pair.run}/{cell}", config', "warn_run(pair, cell, config",
     "two run folders' cells of one name scored as one cell", RULES_TESTS),
    ("lab/rules.py", 'self.sign = -1 if rule.get("direction") == "down" else 1', "self.sign = 1",
     "a frozen rule's concordance read in one direction whatever its own", RULES_TESTS),
    ("lab/earlywarning.py", 'alarm = rule.alarm(run, None, peers_of(run, runs, "cell"))',
     'alarm = rule.alarm(run, None, [r for r in runs if r.stratum == run.stratum])',
     "the config lookup on new runs reads the run's own outcome among its peers", RULES_TESTS),
    ("experiment.py", "loss = run.loss(as_float(logits), yb)", "loss = run.loss(logits.float(), yb)",
     "an fp64 run's training loss computed in float32", PRESET_TESTS),
    ("lab/measures.py", "logits = logits if logits.dtype == torch.float64 else logits.float()",
     "logits = logits.float()", "an fp64 run's softmax collapse counted in float32", PRESET_TESTS),
]


def copy_tree(to: str) -> None:
    for name in ("lab", "tests"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(to, name),
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    for name in ("experiment.py", "plot.py"):
        shutil.copy(os.path.join(ROOT, name), to)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutation numbers (1-based)")
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated test files to run")
    args = parser.parse_args()
    args.tests_given = any(a.startswith("--tests") for a in sys.argv[1:])
    chosen = [int(i) for i in args.only.split(",") if i] or range(1, len(MUTATIONS) + 1)
    survived = 0
    for number in chosen:
        path, old, new, meaning, *own = MUTATIONS[number - 1]
        tests = own[0] if own and not args.tests_given else args.tests.split(",")
        with tempfile.TemporaryDirectory() as folder:
            copy_tree(folder)
            target = os.path.join(folder, path)
            text = open(target).read()
            if text.count(old) != 1:
                print(f"{number:2d} NOT FOUND  {path}: {meaning}")
                survived += 1
                continue
            open(target, "w").write(text.replace(old, new))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   *tests], cwd=folder, capture_output=True, text=True)
            failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED")]
            if proc.returncode == 0:
                survived += 1
                print(f"{number:2d} SURVIVED   {path}: {meaning}")
            else:
                print(f"{number:2d} caught     {path}: {meaning} ({', '.join(failed) or 'error'})")
    print(f"{len(chosen) - survived} of {len(chosen)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
