"""Frozen early-warning rules: fitted once on a sweep (lab.earlywarning), written to earlywarning_rules.json, and
applied to any run afterwards (plot.py --warning_rules=FILE: earlywarning_applied.csv) or while it trains (the
earlywarning plugin: the job's earlywarning.jsonl). The schema and what a rule can and cannot tell are in
docs/analysis.md ("Frozen rules").

A rule is one measure's alarm as lab.earlywarning fits it on every run of the sweep: a direction and a level in
band half-widths of the run's own post-memorisation band (lab.onset: its noise), raised at the last of RUN
consecutive measurements beyond it; beside it, the rule's scores when fitted leaving one cell out (held out). Only
predictors (measures that read no validation labels) are kept, with two rules that read no measurement for
comparison: the fixed delay after memorisation (a baseline) and val accuracy above 3x chance (a reference).
"""

import math
import os
import subprocess
import sys

import numpy as np

from lab import onset
from lab.analysis import TrainedJob, load_run, measure_label
from lab.earlywarning import (CHANCE_TIMES, LEVELS, OFFSETS, ConfigLookup, FixedDelay, Measure, ValAccChance,
                              chance_of, horizon, judge, keys_of, scores_as_is, tally, warn_run)
from lab.files import read_json, write_json, write_jsonl
from lab.phases import load_sweep
from lab.plugins import Plugin, ProgressMeasures, UsageError
from lab.schema import HALF_AT, MEMORISED_AT, SWEEP, is_predictor, reads

VERSION = 1  # of the file's schema and of what its numbers mean; a file of another version is refused
RULES_FILE = "earlywarning_rules.json"
APPLIED_FILE = "earlywarning_applied.csv"
FROZEN_FILE = "earlywarning_frozen.csv"  # the frozen rules' scores on the runs they were applied to
LIVE_FILE = "earlywarning.jsonl"  # the earlywarning plugin's alarms, in each job's folder
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), RULES_FILE)  # fitted on the benchmark sweep
SCORES = ("positives", "negatives", "hits", "false_alarms", "hit_rate", "hit_lo", "hit_hi", "false_alarm_rate",
          "false_alarm_lo", "false_alarm_hi", "J", "J_lo", "J_hi", "J_op", "J_op_lo", "J_op_hi", "lead", "lead_lo",
          "lead_hi", *(f"c_{o}{s}" for o in OFFSETS for s in ("", "_lo", "_hi")))
BASELINE_RULES = {rule.key[2]: rule for rule in (FixedDelay(), ValAccChance())}
APPLIED_COLUMNS = ["job_dir", "run", "cell", "op", "seed", "rule", "measure", "layer", "split", "metric", "reads",
                   "role", "alarm_step", "memorisation_step", "grok_step", "half_step", "lead", "outcome"]
FROZEN_COLUMNS = ["rule", "measure", "reads", "role", "threshold", "fitted_J", "fitted_J_lo", "fitted_J_hi",
                  "fitted_c_500", "fitted_c_500_lo", "fitted_c_500_hi",
                  "positives", "negatives", "hits", "false_alarms", "hit_rate", "hit_lo", "hit_hi", "false_alarm_rate",
                  "false_alarm_lo", "false_alarm_hi", "J", "J_lo", "J_hi", "lead", "lead_lo", "lead_hi",
                  *(f"c_{o}{s}" for o in OFFSETS for s in ("", "_lo", "_hi", "_pairs"))]
OUTCOMES = ("hit", "miss", "false alarm", "correct rejection", "censored", "excluded", "not memorised",
            "not measured")


FITTED_ON = {"sweep": str, "ops": list, "config": dict, "commit": str, "runs": dict}  # what the summary reads


class RulesError(UsageError):
    """A rules file that cannot be applied: one line saying why."""


def constants() -> dict:
    """What a rule's numbers mean in this code: a file fitted under others is stale."""
    return {"band": onset.BAND, "run": onset.RUN, "levels": list(LEVELS), "memorised_at": MEMORISED_AT,
            "half_at": HALF_AT}


def code_commit() -> str:
    """The commit of this checkout ('+dirty' when files differ from it), or 'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _clean(value):
    """JSON has no nan: None instead; numpy numbers as Python's."""
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value.item() if isinstance(value, np.integer) else value


# ----------------------------------------------------------------------------- fit and write
def fit(runs: list, table: list, sweep: dict) -> dict:
    """The rules file of a sweep: every predictor's alarm and the two comparison rules, fitted on all its runs
    (lab.earlywarning.WarnRun), with their held-out scores from its early-warning table (earlywarning.csv rows)."""
    window = horizon(runs)
    held = {(t["layer"], t["split"], t["metric"]): t for t in table}
    rules = []
    for rule in [*BASELINE_RULES.values(), *(Measure(k) for k in keys_of(runs) if is_predictor(reads(*k)))]:
        fitted = rule.fit(runs, window)
        if isinstance(rule, (Measure, FixedDelay)) and fitted is None:
            continue  # no positive or no negative run had it: nothing to fit
        scores = held.get(rule.key, {})
        entry = {"measure": rule.name, "layer": rule.key[0], "split": rule.key[1], "metric": rule.key[2],
                 "reads": rule.reads, "role": scores.get("role", "")}
        if isinstance(rule, Measure):
            entry.update(direction="up" if fitted["sign"] > 0 else "down", level=fitted["level"])
        elif isinstance(rule, FixedDelay):
            entry["delay"] = fitted["delay"]
        entry["held_out"] = {k: _clean(scores.get(k, float("nan"))) for k in SCORES}
        rules.append(entry)
    return {"version": VERSION, "what": "frozen early-warning rules (lab/rules.py, docs/analysis.md 'Frozen rules')",
            "fitted_on": {"sweep": sweep["run"], "ops": sweep["ops"], "fields": sweep["values"],
                          "seeds": sweep["seeds"], "config": _shared_config(sweep), "commit": code_commit(),
                          "runs": tally(runs)},
            "constants": constants(), "horizon": window, "rules": rules}


def _shared_config(sweep: dict) -> dict:
    """The config values every cell of the sweep shares (p, steps, d_model, ...)."""
    configs = [c["config"] for c in sweep["cells"] if c["config"]]
    keep = ("p", "steps", "d_model", "num_layers", "lr", "batch_size", "eval_every", "measure_every", "norm",
            "optimizer", "preset")
    return {k: configs[0][k] for k in keep if configs and k in configs[0] and all(c.get(k) == configs[0][k]
                                                                                   for c in configs)}


def write(path: str, rules: dict) -> None:
    write_json(path, rules)


# ----------------------------------------------------------------------------- read
def read(path: str) -> dict:
    """A rules file, checked: raises RulesError (one line) for a file that is missing, not JSON, of another
    version, fitted under other constants, or with a rule this code does not know."""
    try:
        rules = read_json(path)
    except OSError as e:
        raise RulesError(f"rules file {path}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        raise RulesError(f"rules file {path}: not JSON ({e})")
    if not isinstance(rules, dict) or "version" not in rules:
        raise RulesError(f"rules file {path}: not an early-warning rules file (no version)")
    if rules["version"] != VERSION:
        raise RulesError(f"rules file {path}: version {rules['version']!r}, this code reads version {VERSION}: "
                         "stale; refit it (plot.py on a sweep writes earlywarning_rules.json)")
    if rules.get("constants") != constants():
        raise RulesError(f"rules file {path}: fitted with constants {rules.get('constants')}, this code's are "
                         f"{constants()}: stale; refit it")
    fitted = rules.get("fitted_on")
    if not isinstance(fitted, dict) or not all(isinstance(fitted.get(k), t) for k, t in FITTED_ON.items()):
        raise RulesError(f"rules file {path}: fitted_on needs " + ", ".join(f"{k} ({t.__name__})"
                                                                            for k, t in FITTED_ON.items()))
    window = rules.get("horizon")
    if not isinstance(window, (int, float)) or isinstance(window, bool) or not window > 0:
        raise RulesError(f"rules file {path}: horizon {window!r} is not a positive number of steps")
    if not isinstance(rules.get("rules"), list) or not rules["rules"]:
        raise RulesError(f"rules file {path}: no rules")
    for i, rule in enumerate(rules["rules"]):
        problem = _rule_problem(rule)
        if problem:
            raise RulesError(f"rules file {path}: rule {i + 1}: {problem}")
    return rules


def _rule_problem(rule) -> str:
    if not isinstance(rule, dict) or not all(isinstance(rule.get(k), str) for k in ("layer", "split", "metric",
                                                                                      "reads")):
        return "needs layer, split, metric and reads (strings)"
    if not isinstance(rule.get("held_out", {}), dict):
        return "held_out must be a mapping of score names to numbers"
    key = (rule["layer"], rule["split"], rule["metric"])
    if rule["layer"] == "baseline":
        if rule["metric"] not in BASELINE_RULES:
            return f"unknown baseline {rule['metric']!r} (known: {', '.join(BASELINE_RULES)})"
        if rule["metric"] == "fixed_delay" and not _number(rule.get("delay")):
            return "fixed_delay needs a delay (steps)"
        return ""
    kind = reads(*key)
    if kind == "unknown":
        return f"unknown measure {measure_label(*key)}"
    if kind != rule["reads"]:
        return f"{measure_label(*key)} reads {kind} in this code, not {rule['reads']}: stale; refit it"
    if rule.get("direction") not in ("up", "down") or not _number(rule.get("level")):
        return f"{measure_label(*key)} needs a direction (up or down) and a level (band half-widths)"
    return ""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def alarm_of(rule: dict, run) -> float | None:
    """Steps after memorisation at which the rule alarms in a run (lab.earlywarning.WarnRun), or None: the same
    alarm lab.earlywarning's fit scored."""
    if rule["layer"] == "baseline":
        fitted = {"delay": rule["delay"]} if rule["metric"] == "fixed_delay" else None
        return BASELINE_RULES[rule["metric"]].alarm(run, fitted, [])
    key = (rule["layer"], rule["split"], rule["metric"])
    return Measure(key).alarm(run, {"sign": 1 if rule["direction"] == "up" else -1, "level": rule["level"]}, [])


def rule_keys(rules: dict) -> set:
    return {(r["layer"], r["split"], r["metric"]) for r in rules["rules"] if r["layer"] != "baseline"}


# ----------------------------------------------------------------------------- apply afterwards
def jobs_of(run_dirs: list) -> list:
    """[(TrainedJob, cell, config), ...] of run folders: a sweep's every cell (cell: its name), a run's jobs."""
    found = []
    for run_dir in run_dirs:
        if os.path.exists(os.path.join(run_dir, SWEEP)):
            sweep = load_sweep(run_dir, run_dir)
            found += [(p, cell["name"], cell["values"]) for cell in sweep["cells"] for p in cell["pairs"]]
        else:
            found += [(p, "", {}) for p in load_run(run_dir, run_dir, quiet=True)]
    return found


def outcome(rule_alarm, run, window) -> str:
    """hit / miss (val accuracy reached HALF_AT: the alarm came before it or not), false alarm / correct rejection
    (it never did and stayed at chance for the horizon: an alarm within the horizon or none), censored or
    excluded (lab.earlywarning.WarnRun.status)."""
    judged = judge(run, rule_alarm, window)  # the fit's own verdict, so that applied and fitted outcomes agree
    return {"quiet": "correct rejection", None: run.status(window)}.get(judged, judged)


def warn_runs(rules: dict, jobs: list) -> list:
    """[(pair, cell, WarnRun or None), ...] of jobs_of()'s jobs, with the series the rules read (None: the job
    never memorised). The WarnRun's cell is prefixed with its run folder's name, so that two runs' (op, cell)
    strata stay apart (the config lookup's peers, the within-cell C)."""
    keys = rule_keys(rules)
    return [(pair, cell, warn_run(pair, f"{pair.run}/{cell}", config, chance_of(pair.folder), keys=keys))
            for pair, cell, config in jobs]


def apply(rules: dict, jobs: list, runs: list | None = None) -> list:
    """earlywarning_applied.csv: one row per (job, rule) of jobs_of()'s jobs (rule: its number in the file, from
    1). alarm_step: the step it alarmed
    (empty: never); lead: half_step - alarm_step (negative: the alarm came after val accuracy's 50% step).
    runs: warn_runs() of the jobs, when the caller has them already."""
    window, rows = rules["horizon"], []
    for pair, cell, run in runs if runs is not None else warn_runs(rules, jobs):
        base = {"job_dir": os.path.relpath(pair.folder), "run": pair.run, "cell": cell, "op": pair.op,
                "seed": pair.seed, "memorisation_step": pair.memorisation_step, "grok_step": pair.grok_step,
                "half_step": None if run is None else run.half_step}
        for number, rule in enumerate(rules["rules"], 1):
            row = {**base, "rule": number, **{k: rule[k] for k in ("measure", "layer", "split", "metric", "reads",
                                                                   "role")},
                   "alarm_step": None, "lead": None}
            key = (rule["layer"], rule["split"], rule["metric"])
            if run is None:
                row["outcome"] = "not memorised"
            elif rule["layer"] != "baseline" and key not in run.series:
                row["outcome"] = "not measured"
            else:
                alarm = alarm_of(rule, run)
                if alarm is not None:
                    row["alarm_step"] = int(run.memorisation_step + alarm)
                    if run.half_step is not None:
                        row["lead"] = int(run.half_step - row["alarm_step"])
                row["outcome"] = outcome(alarm, run, window)
            rows.append(row)
    return rows


class Frozen:
    """A frozen rule as lab.earlywarning scores a rule, nothing refitted: its alarm; as a score, its measure's
    value signed by the rule's direction (higher: sooner), or its baseline's own score."""

    alarms = True

    def __init__(self, rule: dict):
        self.rule, self.key = rule, (rule["layer"], rule["split"], rule["metric"])
        self.sign = -1 if rule.get("direction") == "down" else 1

    def reads_run(self, run) -> bool:
        return self.key[0] == "baseline" or self.key in run.series

    def alarm(self, run, fitted, peers):
        return alarm_of(self.rule, run)

    def score(self, run, offset: int, peers) -> float:
        if self.key[0] == "baseline":
            return BASELINE_RULES[self.key[2]].score(run, offset, peers)
        return self.sign * run.value_at(self.key, offset)


def frozen_scores(rules: dict, jobs: list, runs: list | None = None) -> list:
    """earlywarning_frozen.csv: every rule of the file scored as it is on jobs_of()'s jobs at the file's horizon
    (hit and false-alarm rates with Wilson intervals, J and the leads with a bootstrap over (op, cell), the
    within-cell C), beside its held-out J on the sweep it was fitted on; last, the config lookup on these runs
    (alarm when most other seeds of the run's cell reach val accuracy 0.5: it reads their labels, not this run's).
    runs: as apply()'s."""
    mine = [run for *_, run in (runs if runs is not None else warn_runs(rules, jobs)) if run is not None]
    rows = []
    for number, rule in enumerate([*rules["rules"], None], 1):
        scorer = ConfigLookup() if rule is None else Frozen(rule)
        entry = ({"rule": "", "measure": "config lookup (these runs)", "reads": "config", "role": "baseline"}
                 if rule is None else {"rule": number, **{k: rule[k] for k in ("measure", "reads", "role")}})
        held = {} if rule is None else rule.get("held_out", {})
        entry.update({"threshold": "" if rule is None else threshold_text(rule),
                      **{f"fitted_{k}": held.get(k) for k in ("J", "J_lo", "J_hi", "c_500", "c_500_lo", "c_500_hi")},
                      **scores_as_is(scorer, mine, rules["horizon"])})
        rows.append(entry)
    return rows


def best(rules: dict, k: int = 3) -> list:
    """The k predictor rules of highest held-out J on the sweep they were fitted on (ties: higher C500)."""
    def score(r):
        h = r.get("held_out", {})
        return tuple(-2.0 if h.get(s) is None else h[s] for s in ("J", "c_500"))
    return sorted((r for r in rules["rules"] if is_predictor(r["reads"])), key=score, reverse=True)[:k]


def _held_text(rule: dict) -> str:
    h = {k: rule.get("held_out", {}).get(k) for k in SCORES}  # a hand-made rule may have no scores: n/a

    def f(x, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x)
    return (f"held-out J {f(h['J'])} [{f(h['J_lo'])}, {f(h['J_hi'])}], hits {f(h['hits'], '{:g}')}/"
            f"{f(h['positives'], '{:g}')}, false alarms {f(h['false_alarms'], '{:g}')}/{f(h['negatives'], '{:g}')}, "
            f"C500 {f(h['c_500'])}")


def threshold_text(rule: dict) -> str:
    if "level" in rule:
        return f"{rule['direction']} {rule['level']:g} band half-widths"
    return f"{rule['delay']:g} steps after memorisation" if "delay" in rule else f"above {CHANCE_TIMES}x chance"


def _here_text(score: dict) -> str:
    """A frozen_scores() row in words: J here with its interval and the counts it comes from."""
    if not score or not score["positives"] or not score["negatives"]:
        return "J here n/a (needs runs that reach val acc 0.5 and runs that stay at chance)"
    return (f"J here {score['J']:.2f} [{score['J_lo']:.2f}, {score['J_hi']:.2f}] ({score['hits']}/{score['positives']}"
            f" hits, {score['false_alarms']}/{score['negatives']} false alarms)")


def summary_lines(rules: dict, path: str, applied: list, scores: list = ()) -> list:
    """What the frozen rules said of these runs, for analysis_summary.md and the notes.txt block; scores:
    frozen_scores() of the same runs (J here, and the config lookup's on these runs)."""
    fitted = rules["fitted_on"]
    jobs = {r["job_dir"] for r in applied}
    lines = [f"Frozen early-warning rules ({path}: fitted on {fitted['sweep']} ({', '.join(fitted['ops'])}, "
             f"p={fitted['config'].get('p', '?')}, {fitted['runs'].get('positive', '?')} runs reaching val acc "
             f"{HALF_AT} and {fitted['runs'].get('negative', '?')} at chance) at commit {fitted['commit'][:12]}; "
             f"applied to {len(jobs)} job(s) here: {APPLIED_FILE}; "
             + ("on 3 setups it was not fitted on it did not beat the config lookup: docs/findings.md"
                if os.path.abspath(path) == SHIPPED else "untested on setups other than the sweep's")
             + "). Alarms are in the run's own post-memorisation noise units."]
    here = {s["rule"]: s for s in scores}
    if "" in here:
        lines.append(f"- To beat here (scores of every rule on these runs: {FROZEN_FILE}): the config lookup, which "
                     "alarms at memorisation when most other seeds of the run's cell reach val acc 0.5 (reads no "
                     f"measurement), {_here_text(here[''])}.")
    number = {id(r): i for i, r in enumerate(rules["rules"], 1)}
    for rule in [*best(rules), *(r for r in rules["rules"] if r["metric"] == "fixed_delay")]:
        mine = [r for r in applied if r["rule"] == number[id(rule)]]
        fired = sorted(r["alarm_step"] - r["memorisation_step"] for r in mine if r["alarm_step"] is not None)
        counts = {o: sum(r["outcome"] == o for r in mine) for o in OUTCOMES}
        told = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
        when = f", median {int(np.median(fired))} steps after memorisation" if fired else ""
        lines.append(f"- {rule['measure']} (reads {rule['reads']}; {threshold_text(rule)}; on {fitted['sweep']}: "
                     f"{_held_text(rule)}): alarmed in {len(fired)}/{len(mine)} job(s){when}; here: "
                     f"{told or 'no jobs'}" + (f"; {_here_text(here[number[id(rule)]])}" if here else "") + ".")
    return lines


# ----------------------------------------------------------------------------- apply while training
class EarlyWarning(Plugin):
    """Applies a frozen rules file (Config.warning_rules; empty: the shipped lab/earlywarning_rules.json) while the
    job trains, at each measurement of the measures plugin, to what it has measured so far, and logs each rule's
    alarm the first time it is raised into the job's earlywarning.jsonl: {"step" (when it was known), "measure",
    "layer", "split", "metric", "reads", "alarm_step", "memorisation_step"}. The alarm steps equal plot.py
    --warning_rules applied to the finished job (tested). Its hooks run after every other plugin's (last), so that
    it reads this step's whole log row. Prints one line when the best predictor rule alarms."""

    name = "earlywarning"
    batchable = True
    last = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.measure:
            raise UsageError("the earlywarning plugin reads the measures plugin's measurements: drop --measure=false")
        read(cfg.warning_rules or SHIPPED)

    def on_train_begin(self, run):
        self.rules = read(run.cfg.warning_rules or SHIPPED)
        self.keys = rule_keys(self.rules)
        self.source = next(p for p in run.hooks.plugins if isinstance(p, ProgressMeasures))
        self.chance = 1 / len(np.unique(run.task.y.numpy()))
        self.fired, self.alarms = set(), []
        self.path = os.path.join(run.out_dir, LIVE_FILE)
        top = best(self.rules, 1)
        self.top = top[0]["measure"] if top else None

    def on_eval(self, run, step, metrics):
        rows = self.source.rows
        if not rows or rows[-1]["step"] != step or len(self.fired) == len(self.rules["rules"]):
            return  # not a measurement step, or every rule has alarmed
        job = TrainedJob("", run.op, run.seed, run.out_dir, [*run.history, metrics], None)
        if job.memorisation_step is None:
            return
        found = warn_run(job, "", {}, self.chance, measured=rows, keys=self.keys)
        if found is None or len(found.grid) < onset.BAND + onset.RUN:
            return  # an alarm needs the band and RUN measurements after it
        for i, rule in enumerate(self.rules["rules"]):
            alarm = None if i in self.fired else alarm_of(rule, found)
            if alarm is None:
                continue
            self.fired.add(i)
            self.alarms.append({"step": step, **{k: rule[k] for k in ("measure", "layer", "split", "metric", "reads")},
                                "alarm_step": int(found.memorisation_step + alarm),
                                "memorisation_step": int(found.memorisation_step)})
            if rule["measure"] == self.top:
                print(f"experiment.py: {run.op} seed {run.seed}: early warning at step {step}: {rule['measure']} "
                      f"(reads {rule['reads']}) alarmed ({_held_text(rule)} on "
                      f"{self.rules['fitted_on']['sweep']})", file=sys.stderr)
        if self.alarms and self.alarms[-1]["step"] == step:
            write_jsonl(self.path, self.alarms)
