#!/usr/bin/env bash
# The GPU checks and figures in one go (not run by CI): the test suite on CUDA, a smoke run, the step against the
# template's on the same GPU, batched throughput against the number of models, the default experiment's wall time,
# the template's whole process side by side with ours, and a Ray cluster with the GPU against a local run.
#
#     bash tests/bench_gpu.sh PART... [LOGS=folder] [TEMPLATE=path/to/templates/grokking/experiment.py]
#
# PART: env, suite, smoke, speed, batched, default, template, ray (in the order given). Each part's output goes to
# LOGS/PART.log (LOGS defaults to gpu_logs) and its last lines to the terminal; a failing part does not stop the
# others. PYTHON (default python3) runs everything; PYTEST_ARGS is added to the suite's pytest command (for example
# "-n 8" where pytest-xdist is installed). The suite leaves out tests/test_ray.py where ray is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-gpu_logs}
TEMPLATE=${TEMPLATE:-}
parts=()
for arg in "$@"; do
    case $arg in
        LOGS=*) LOGS=${arg#LOGS=} ;;
        TEMPLATE=*) TEMPLATE=${arg#TEMPLATE=} ;;
        env|suite|smoke|speed|batched|default|template|ray) parts+=("$arg") ;;
        *) echo "bench_gpu.sh: unknown part $arg (env, suite, smoke, speed, batched, default, template, ray)" >&2
           exit 2 ;;
    esac
done
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

timed() {  # timed LABEL COMMAND...: runs it, then prints "LABEL: N s wall"
    local label=$1 start rc
    shift
    start=$(date +%s.%N)
    "$@"
    rc=$?
    echo "$label: $($PYTHON -c "print(round($(date +%s.%N) - $start, 1))") s wall"
    return $rc
}

run_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    $PYTHON -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    $PYTHON -m pip list 2>/dev/null |
        grep -i -E "^(numpy|matplotlib|scikit-learn|datasets|transformers|safetensors|pyarrow|pytest|ray|einops) "
}

run_suite() {
    local ignore=()
    if ! $PYTHON -c "import ray" 2>/dev/null; then
        echo "ray is not installed: tests/test_ray.py left out"
        ignore=(--ignore=tests/test_ray.py)
    fi
    # shellcheck disable=SC2086
    $PYTHON -m pytest -q -p no:cacheprovider -rfE --durations=15 "${ignore[@]}" ${PYTEST_ARGS:-} tests
}

run_smoke() {
    local tmp
    tmp=$(mktemp -d)
    for mode in on off; do
        timed "batched=$mode" $PYTHON experiment.py --out_dir="$tmp/$mode" --device=cuda \
            --ops=x_plus_y,x_minus_y --seeds=2 --steps=300 --batched=$mode --progress=none || return
    done
    $PYTHON - "$tmp" <<'EOF'
import json, sys
on, off = (json.load(open(f"{sys.argv[1]}/{m}/final_info.json")) for m in ("on", "off"))
for op in on:
    print(op, {k: (round(on[op]["means"][k], 4), round(off[op]["means"][k], 4)) for k in on[op]["means"]})
EOF
    rm -rf "$tmp"
}

run_default() {
    local out=$LOGS/default_run
    rm -rf "$out"
    timed "the default experiment, --device=cuda" $PYTHON experiment.py --out_dir="$out" --device=cuda \
        --progress=none || return
    tar -czf "$LOGS/default_run.tar.gz" --exclude="*.safetensors" -C "$LOGS" default_run
    $PYTHON -c "import json; d = json.load(open('$out/final_info.json'));
print({op: {k: round(v, 3) for k, v in d[op]['means'].items()} for op in d})"
}

run_ray() {  # a one-node cluster with this GPU, --device=auto: the same bytes as a local --device=cuda run
    local tmp port rc=0
    tmp=$(mktemp -d)
    port=$($PYTHON -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    $PYTHON -c "from ray.scripts.scripts import main; main()" start --head --port="$port" \
        --node-ip-address=127.0.0.1 --include-dashboard=false --disable-usage-stats --temp-dir="$tmp/ray" || return
    local args=(--ops=x_plus_y,x_minus_y --seeds=2 --steps=300 --progress=none)
    timed "local, --device=cuda" $PYTHON experiment.py --out_dir="$tmp/local" --device=cuda "${args[@]}" || rc=1
    timed "Ray, --device=auto" $PYTHON experiment.py --out_dir="$tmp/ray_run" --ray_address="127.0.0.1:$port" \
        "${args[@]}" || rc=1
    $PYTHON - "$tmp" <<'EOF' || rc=1
import pathlib, sys
tmp = pathlib.Path(sys.argv[1])
names = sorted(p.relative_to(tmp / "local") for p in (tmp / "local").rglob("*") if p.suffix in (".json", ".jsonl",
               ".safetensors") and p.name not in ("run.json", "config.json"))
same = [n for n in names if (tmp / "local" / n).read_bytes() == (tmp / "ray_run" / n).read_bytes()]
print(f"{len(same)} of {len(names)} files byte-identical, Ray against local")
sys.exit(len(same) != len(names))
EOF
    $PYTHON -c "import sys; sys.path.insert(0, 'tests'); from test_ray import stop_cluster
stop_cluster('$tmp/ray')" || rc=1  # this cluster alone
    rm -rf "$tmp"
    return $rc
}

for part in "${parts[@]}"; do
    echo "== $part"
    start=$SECONDS
    case $part in
        env) run_env ;;
        suite) run_suite ;;
        smoke) run_smoke ;;
        speed) $PYTHON tests/bench_speed.py --gpu_only ;;
        batched) $PYTHON tests/bench_batched.py --gpu_only ;;
        default) run_default ;;
        template) $PYTHON tests/bench_template.py --device=cuda --template="$TEMPLATE" --repeats=3 ;;
        ray) run_ray ;;
    esac > "$LOGS/$part.log" 2>&1
    rc=$?
    tail -n 25 "$LOGS/$part.log"
    echo "== $part: exit $rc, $((SECONDS - start)) s"
done
