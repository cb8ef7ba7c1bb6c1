#!/usr/bin/env bash
# `make gpu-check`: the GPU path in one command, sized for one H200 and under 8 minutes (issue #15).
#
#   benchmarks/gpu_check.sh          On a CUDA machine: tests/test_gpu.py (the pre-training worker on nccl
#                                    GPU workers with bf16, channels_last, EMA, MixUp, compile off and on;
#                                    fp16 with a GradScaler), then benchmarks/bench_train.py on ResNet-50 at
#                                    224 px, bf16, channels_last, with synthetic and with shard data in one run,
#                                    then benchmarks/bench_data.py at 1 and 4 loader workers with the CPU and the
#                                    GPU decode paths (img/s and host CPU per image, issue #16), then a summary
#                                    table against the goals (>= 4,000 img/s with synthetic data on one H200,
#                                    shards >= 0.95x synthetic). Without CUDA it prints
#                                    "no CUDA device: skipped" and exits 0.
#   benchmarks/gpu_check.sh rehearse The same steps on CPU with a tiny model (cifar_resnet20, 32 px; the GPU
#                                    tests skip): tries the script's flow, the bundle and the summary here.
#   benchmarks/gpu_check.sh bundle   Here, where PyPI is reachable: writes .cache/gpu-bundle, the packages the
#                                    GPU machine's image lacks, for its Python (3.12; GPU_BUNDLE_PYTHON=3.11
#                                    for a local trial): Ray slimmed to ~30 MB (its Java jars, RLlib, Serve,
#                                    LLM and dashboard source maps dropped), webdataset and Ray's small needs.
#                                    The image has torch, torchvision, numpy, pillow, pandas, pyarrow, pytest.
#
# On the GPU machine (the device tool's `run`, carry [".cache/gpu-bundle"]):  bash benchmarks/gpu_check.sh
# The bundle is unpacked into /tmp/gpu-check-site first when `import ray` fails. Everything printed also goes
# to $OUT/gpu_check.log (with bench_train.json and pytest.xml) when OUT is set, else to .cache/gpu-check/.
# Step time caps (seconds, env): GPU_CHECK_PYTEST_S=240, GPU_CHECK_BENCH_S=210, GPU_CHECK_PROBE_S=40,
# GPU_CHECK_DATA_S=120.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    PY=$GPU_CHECK_PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3 # the GPU machine: its image's Python holds torch
fi
BUNDLE=${GPU_BUNDLE_DIR:-.cache/gpu-bundle}
SITE=/tmp/gpu-check-site

bundle() {
    local pyver=${GPU_BUNDLE_PYTHON:-3.12}
    local ray_version
    ray_version=$(sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
    [[ -n $ray_version ]] || { echo "bundle: no ray pin found in pyproject.toml" >&2; return 1; }
    local work
    work=$(mktemp -d)
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    # Ray's own needs and the project's pure-Python data stack, at the versions this venv runs with Ray.
    local pins
    pins=$("$PY" - <<'EOF'
import importlib.metadata as md
names = ["webdataset", "braceexpand", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
         "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "tensorboardX"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
EOF
    ) || return 1
    echo "bundle: downloading ray==$ray_version $pins for CPython $pyver (manylinux x86_64)"
    # $pins unquoted: a list of requirements. This machine's pip config names local indexes that warn once per
    # package (as in the Makefile's setup); pipefail keeps pip's exit code.
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$work" "ray==$ray_version" $pins 2>&1 |
        { grep -v 'is ignored: it is neither a file nor a directory' || true; } || return 1
    mkdir -p "$work/ray"
    (cd "$work/ray" && unzip -q ../ray-"$ray_version"-*.whl) || return 1
    rm -rf "$work"/ray/ray/{jars,rllib,serve,llm} "$work"/ray/ray/dashboard/client/build/static/js/*.map
    echo "bundle: compressing the slimmed Ray (about a minute)"
    tar -C "$work/ray" -cf - . | xz -T0 -6 >"$BUNDLE/ray-$ray_version-slim.tar.xz" || return 1
    find "$work" -maxdepth 1 -name '*.whl' ! -name 'ray-*' -exec mv {} "$BUNDLE/" \;
    echo "$pyver" >"$BUNDLE/PYTHON"
    rm -rf "$work"
    echo "bundle: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE; carry it: run(..., carry=[\"$BUNDLE\"])"
}

# Ray and webdataset from the bundle when the Python lacks them; sets PYTHONPATH (after the checkout's path).
install_bundle() {
    "$PY" -c 'import ray, webdataset' 2>/dev/null && return 0
    if [[ ! -d $BUNDLE ]]; then
        echo "ray or webdataset missing and no $BUNDLE: make it with 'benchmarks/gpu_check.sh bundle', carry it"
        return 1
    fi
    echo "installing $BUNDLE (made for Python $(cat "$BUNDLE/PYTHON")) into $SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$BUNDLE"/*.whl && tar -C "$SITE" -xJf "$BUNDLE"/ray-*-slim.tar.xz &&
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"
}

REHEARSE=0
case ${1:-} in
rehearse) # the same steps on CPU with a tiny model: tries this script's flow where there is no GPU
    REHEARSE=1
    ;;
bundle)
    bundle
    exit $?
    ;;
install) # only the bundle's installation (for trying the bundle on another machine): prints PYTHONPATH
    install_bundle >&2 && echo "${PYTHONPATH:-}"
    exit $?
    ;;
"") ;;
*)
    echo "usage: $0 [bundle|rehearse]" >&2
    exit 2
    ;;
esac

if [[ $REHEARSE == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device: skipped"
    exit 0
fi
# ~100 s of ResNet-50 steps on one H200 (3 sides x 3 epochs x 100 steps of 256 images at ~4,000 img/s), plus
# ~30 s to render and shard 25,600 JPEGs of 256 px (once; .cache/bench/train-shards) and ~15 s per Ray worker.
BENCH_ARGS=(--model resnet50 --resolution 224 --batch-size 256 --device cuda --channels-last --amp bf16
    --data both --steps 100 --epochs 3 --repeats 1)
# ~40 s: 2,560 JPEGs of 256 px (rendered once), every data path once at 1 and 4 loader workers.
DATA_ARGS=(--workers 4 --worker-counts 1,4 --images 2560 --repeats 1 --epochs 1)
if [[ $REHEARSE == 1 ]]; then
    BENCH_ARGS=(--model cifar_resnet20 --resolution 32 --batch-size 32 --device cpu --data both --steps 12
        --epochs 3 --repeats 1 --cpus-per-worker 1 --threads 1)
    DATA_ARGS=(--workers 2 --worker-counts 1,2 --images 1200 --image-size 64 --resolution 32 --repeats 1 --epochs 1)
fi

LOG_DIR=${OUT:-.cache/gpu-check}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
step() { echo -e "\n== [$((SECONDS - START)) s] $*"; }
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
# Ray workers import the project from the checkout (it is not pip-installed on the GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "environment"
install_bundle
"$PY" - <<'EOF'
import importlib, os, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'GPU'}, "
      f"{os.cpu_count()} CPUs")
for name in ("torchvision", "ray", "webdataset", "mlflow"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except ImportError as error:
        print(f"  {name}: not importable ({error})")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
PROBE=skipped
if [[ $GPUS == 1 ]]; then
    step "probe: can 2 nccl ranks share this one GPU? (why test_gpu.py runs 1 rank here)"
    probe_file=$(mktemp --suffix=.py)
    cat >"$probe_file" <<'EOF'
import socket, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def rank_main(rank, port):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.ones(4, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    assert x[0].item() == 2
    dist.destroy_process_group()

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(rank_main, args=(port,), nprocs=2)
    except Exception as error:
        lines = [l for l in str(error).splitlines() if "Duplicate GPU" in l or "Error" in l]
        print("2 nccl ranks on one GPU: refused:", (lines or [type(error).__name__])[-1].strip()[:200])
        sys.exit(1)
    print("2 nccl ranks on one GPU: all_reduce works")
EOF
    probe_out=$(timeout "${GPU_CHECK_PROBE_S:-40}" "$PY" "$probe_file" 2>&1)
    probe_rc=$?
    echo "$probe_out" | grep -E "^2 nccl ranks" || echo "$probe_out" | tail -3
    if [[ $probe_rc == 0 ]]; then PROBE=works; elif [[ $probe_rc == 124 ]]; then PROBE=timeout; else PROBE=refused; fi
    rm -f "$probe_file"
fi

step "pytest tests/test_gpu.py (cap ${GPU_CHECK_PYTEST_S:-240} s)"
timeout "${GPU_CHECK_PYTEST_S:-240}" "$PY" -m pytest tests/test_gpu.py -v -s -p no:cacheprovider \
    --junitxml="$LOG_DIR/pytest.xml"
PYTEST_RC=$?

step "bench_train.py ${BENCH_ARGS[*]} (cap ${GPU_CHECK_BENCH_S:-210} s)"
rm -f "$LOG_DIR/bench_train.json"
timeout "${GPU_CHECK_BENCH_S:-210}" "$PY" benchmarks/bench_train.py "${BENCH_ARGS[@]}" \
    --json "$LOG_DIR/bench_train.json"
BENCH_RC=$?

step "bench_data.py ${DATA_ARGS[*]} (cap ${GPU_CHECK_DATA_S:-120} s)"
rm -f "$LOG_DIR/bench_data.json"
timeout "${GPU_CHECK_DATA_S:-120}" "$PY" benchmarks/bench_data.py "${DATA_ARGS[@]}" --json "$LOG_DIR/bench_data.json"

step "summary (total $((SECONDS - START)) s)"
"$PY" - "$LOG_DIR" "$PYTEST_RC" "$BENCH_RC" "$PROBE" "$((SECONDS - START))" <<'EOF'
import json, statistics, sys
import xml.etree.ElementTree as ET
from pathlib import Path

log_dir, pytest_rc, bench_rc, probe, total_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
IMAGES_GOAL, RATIO_GOAL = 4000, 0.95
rows = []

def row(check, value, goal="", met=None):
    rows.append((check, value, goal, "" if met is None else ("met" if met else "NOT met")))

try:
    suite = ET.parse(log_dir / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    text = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
except (OSError, ET.ParseError, IndexError):
    passed, text = 0, f"no report (exit {pytest_rc}{', timed out' if pytest_rc == 124 else ''})"
row("pytest tests/test_gpu.py", text, "all pass", pytest_rc == 0 and passed > 0)
row("2 nccl ranks on one GPU (probe)", probe)
try:
    bench = json.loads((log_dir / "bench_train.json").read_text())
except (OSError, ValueError):
    bench = None
    row("bench_train.py", f"no result (exit {bench_rc}{', timed out' if bench_rc == 124 else ''})", "", False)
if bench is not None:
    med = lambda values: statistics.median(values)
    synthetic = med(bench["images_per_s"]["synthetic"])
    row("img/s, ours, synthetic (loop's system/images_per_s)", f"{synthetic:,.0f}", f">= {IMAGES_GOAL:,}", synthetic >= IMAGES_GOAL)
    row("img/s, bare PyTorch loop, synthetic", f"{med(bench['bare_images_per_s']):,.0f}")
    row("ratio ours / bare, synthetic", f"{bench['ratio_median']:.3f}", ">= 0.95", bench["ratio_median"] >= RATIO_GOAL)
    for kind, key in (("loop", "images_per_s"), ("steady state", "steady_images_per_s")):
        row(f"img/s, ours, shards ({kind})", f"{med(bench[key]['shards']):,.0f}")
    ratio = med(bench["ratios"]["shards / synthetic, steady state"])
    row("ratio shards / synthetic, steady state", f"{ratio:.3f}", f">= {RATIO_GOAL}", ratio >= RATIO_GOAL)
    loop_ratio = med(bench["ratios"]["shards / synthetic, loop's img/s"])
    row("ratio shards / synthetic, loop's whole epochs", f"{loop_ratio:.3f}")
    for feed in ("synthetic", "shards"):
        row(f"data wait, {feed} (loop / steady state)",
            f"{med(bench['data_wait'][feed]):.3f} / {med(bench['steady_data_wait'][feed]):.3f}")
    row("shards: loader start per epoch, s", f"{med(bench['first_batch_s']['shards']):.2f}")
try:
    data = json.loads((log_dir / "bench_data.json").read_text())["results"]
except (OSError, ValueError, KeyError):
    data = None
    row("bench_data.py", "no result", "", False)
if data is not None:
    fmt = lambda value, spec: "n/a" if value is None else format(value, spec)
    gpu_name = "loader, decode on the GPU (data.decode: gpu)"
    for key in sorted(k for k in data if k.startswith("local/")):
        n = key.split("/")[1]
        cpu, gpu = data[key], data.get(f"{gpu_name}/{n}", {})
        row(f"data, {n} loader workers: img/s, decode cpu / gpu",
            f"{fmt(cpu.get('img_s'), ',.0f')} / {fmt(gpu.get('img_s'), ',.0f')}")
        row(f"data, {n} loader workers: host CPU s per 1k img, decode cpu / gpu",
            f"{fmt(cpu.get('cpu_s_per_1k'), '.2f')} / {fmt(gpu.get('cpu_s_per_1k'), '.2f')}")
row("gpu-check wall time, s", str(total_s), "< 480", total_s < 480)
width = max(len(r[0]) for r in rows)
print(f"| {'check':<{width}} | value | goal | verdict |\n|{'-' * (width + 2)}|---:|---|---|")
for check, value, goal, met in rows:
    print(f"| {check:<{width}} | {value} | {goal} | {met} |")
EOF
[[ $PYTEST_RC == 0 && $BENCH_RC == 0 ]]
