#!/usr/bin/env bash
# The one prepared script for the first GPU (issue 9): every figure the GPU path needs, as JSON.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, < 8 minutes
#   DRY_RUN=1 bash benchmarks/device_check.sh       # the same steps on the CPU, tiny (the test suite runs it)
#
# Writes under $OUT (default benchmarks/results/device): one <step>.json per step, with its rc,
# seconds, timeout, the log's tail and the figures it produced (`result`), <step>.log, and
# summary.json gathering them all. A failing or timed-out step does not stop the others; a step
# that would start past the overall deadline (DEADLINE_S) is recorded as skipped.
#
# Steps: env (nvidia-smi, torch/DALI versions, arch list, the build select_build.py would pick,
# pick_device and the per-card guards) · setup (.devwheels/install.sh where DALI is missing: see
# shared/gpu/fetch-wheels.sh) · data (synthetic studies -> shards, by this script) · gpu-tests
# (`pytest -m gpu tests/`, one outcome per test, and the slots sync-debug, DALI checkpoint, GPU vs
# CPU CLAHE, kill-and-resume filled from the tests whose names match) · train-<precision>-<cl|nocl>
# (`bench train` for tf_efficientnetv2_s at 384 px, batch_size auto under 16 GB) · loader (DALI
# mixed decode and its CPU cores, `bench loader`).
#
# Knobs (environment): OUT, DRY_RUN, PYTHON, WORK (synthetic data; reused when complete),
# DEADLINE_S, STEPS, WARMUP, PRECISIONS ("bf16 fp16"), LAYOUTS ("cl nocl"), STUDIES, GPU_TESTS (tests/).
# gpu-marked tests may write figures as JSON into $SPINESTREAM_DEVICE_CHECK_OUT (= $OUT/figures):
# summary.json includes them.
set -uo pipefail   # no -e: a failing step must not stop the others

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-benchmarks/results/device}
PY=${PYTHON:-python3}
WORK=${WORK:-${TMPDIR:-/tmp}/spinestream-device-check$([ "$DRY_RUN" = 1 ] && echo -dry)}
DEADLINE_S=${DEADLINE_S:-450}
mkdir -p "$OUT/figures" "$WORK"
OUT=$(cd "$OUT" && pwd)
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"   # the GPU machine's wheels
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SPINESTREAM_DEVICE_CHECK_OUT="$OUT/figures" WANDB_MODE=offline PYTHONUNBUFFERED=1
START=${START:-$(date +%s)}
SELF="$ROOT/benchmarks/device_check.sh"
export OUT WORK DRY_RUN START PYTHON="$PY"

if [ "$DRY_RUN" = 1 ]; then
  # the CPU has no fast half precision (fp16/bf16 autocast crawls there): fp32, float32 batches
  : "${PRECISIONS:=fp32}" "${LAYOUTS:=cl nocl}" "${STEPS:=2}" "${WARMUP:=1}" "${STUDIES:=16}"
  SIZE=64 SLICES=12:16 SHARD_SAMPLES=32
  TRAIN_SET=(--set model.name=test_efficientnet --set loader.image_size=64 --set train.device=cpu
             --set loader.batch_size=4 --set loader.dtype=float32 --set loader.num_threads=1)
  LOADER_ARGS=(--lines dali-cpu,decode-only --image-size 64 --batch-size 4 --batches 2 --warmup 1 --workers 1)
  PYTEST_MODE=(--collect-only -q)   # proves the selection runs; the gpu tests need a GPU
  : "${GPU_TESTS:=tests/test_build_select.py}"   # collecting all of tests/ imports everything: slow here
  # one thread: a tiny model on a shared CPU is 50x slower when OpenMP threads fight for the cores
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  T_TRAIN=120 T_LOADER=90 T_DATA=120 T_TESTS=120
else
  : "${PRECISIONS:=bf16 fp16}" "${LAYOUTS:=cl nocl}" "${STEPS:=20}" "${WARMUP:=5}" "${STUDIES:=16}"
  SIZE=512 SLICES=40:56 SHARD_SAMPLES=256
  TRAIN_SET=(--set model.name=tf_efficientnetv2_s --set loader.image_size=384 --set train.batch_size=auto
             --set train.max_memory_gb=16)
  LOADER_ARGS=(--lines dali-gpu,dali-cpu,decode-only --image-size 384 --batch-size 64 --batches 30 --warmup 5)
  PYTEST_MODE=(-q -rA)
  : "${GPU_TESTS:=tests/}"
  T_TRAIN=90 T_LOADER=90 T_DATA=150 T_TESTS=180
fi
DATA_SIZE=$([ "$DRY_RUN" = 1 ] && echo 64 || echo 384)
SHARDS="$WORK/shards-$DATA_SIZE"

# record NAME RC MILLISECONDS TIMEOUT [RESULT_JSON_FILE...]: NAME.json from the step's outcome
record() {
  "$PY" - "$OUT" "$@" <<'PYEOF'
import json, os, sys
out, name, rc, secs, limit, *files = sys.argv[1:]
log = os.path.join(out, f"{name}.log")
tail = open(log, errors="replace").read()[-3000:] if os.path.exists(log) else ""
result = {}
for f in files:
    try:
        result[os.path.basename(os.path.dirname(f)) or f] = json.load(open(f))
    except (OSError, ValueError) as e:
        result[f] = {"missing": str(e)}
rc = None if rc == "" else int(rc)
doc = {"step": name, "rc": rc, "ok": rc == 0, "timed_out": rc in (124, 137), "seconds": int(secs) / 1000,
       "timeout_s": int(limit), "result": result, "log_tail": tail}
if rc is None:
    doc.update(ok=False, skipped=tail.strip() or "skipped")
tmp = os.path.join(out, f".{name}.json.tmp")
json.dump(doc, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, f"{name}.json"))  # atomic: a killed run leaves no half file
PYEOF
}

# step NAME TIMEOUT_S RESULT_FILES -- CMD...: run CMD under timeout, log it, record it
step() {
  local name=$1 limit=$2; shift 2
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done; shift
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    echo "deadline: ${DEADLINE_S}s spent before this step" > "$OUT/$name.log"
    record "$name" "" 0 "$limit"; echo "== $name: skipped (deadline)"; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (timeout ${limit}s)"
  local t0=$(date +%s%N)
  # the script runs itself for the step (`--run`): timeout cannot run a shell function directly
  timeout --kill-after=10 "$limit" bash "$SELF" --run "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  record "$name" "$rc" "$ms" "$limit" "${files[@]}"
  echo "   rc=$rc $((ms / 1000))s"
}

env_probe() {
  "$PY" - "$OUT/env/env.json" <<'PYEOF'
import json, os, platform, subprocess, sys
res = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "host": platform.node()}
def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return {"rc": r.returncode, "out": r.stdout[-4000:], "err": r.stderr[-2000:]}
    except (OSError, subprocess.SubprocessError) as e:
        return {"rc": None, "err": str(e)}
res["nvidia_smi_query"] = run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                               "--format=csv,noheader"])
res["nvidia_smi"] = run(["nvidia-smi"])
res["select_build"] = run([sys.executable, ".ci/select_build.py", "--no-probe"])
import torch
res["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "arch_list": torch.cuda.get_arch_list(),
                "cuda_available": torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}
for mod in ("torchvision", "timm", "nvidia.dali", "webdataset", "numpy"):
    try:
        res.setdefault("versions", {})[mod] = __import__(mod, fromlist=["_"]).__version__
    except Exception as e:  # noqa: BLE001 — a missing package is a figure too
        res.setdefault("versions", {})[mod] = f"missing: {e}"
from spinestream.engine import device as dv
try:
    d = dv.pick_device("auto")
    res["pick_device"] = str(d)
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        res["gpu"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(d)),
                      "memory_gib": p.total_memory / 2**30, "multiprocessors": p.multi_processor_count}
    res["guards"] = {"precision_auto": dv.resolve_precision("auto", d), "compile_unsupported": dv.compile_unsupported(d),
                     "channels_last_default": dv.channels_last_default(d, True),
                     "hw_jpeg_decoder": dv.has_hw_jpeg_decoder(d)}
    if d.type == "cuda":
        try:
            res["guards"]["bf16_explicit"] = dv.resolve_precision("bf16", d)
        except RuntimeError as e:
            res["guards"]["bf16_explicit"] = f"refused: {e}"
except RuntimeError as e:
    res["pick_device"] = f"error: {e}"
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: res[k] for k in ("torch", "pick_device")}, indent=1))
PYEOF
}

setup_wheels() {
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then echo "nvidia.dali importable: nothing to install"; return 0; fi
  if [ ! -f .devwheels/install.sh ]; then echo "no .devwheels/install.sh: the DALI lines will be missing"; return 0; fi
  bash .devwheels/install.sh
}

make_data() {
  set -e
  if [ -f "$SHARDS/manifest.json" ]; then echo "reusing $SHARDS"; return 0; fi
  local raw="$WORK/raw-$SIZE-$STUDIES"
  [ -f "$raw/SYNTH_COMPLETE" ] || "$PY" -m spinestream.cli synth --out "$raw" --studies "$STUDIES" --size "$SIZE" \
      --slices "$SLICES" --test-studies 0 --syntax explicit --seed 0 --quiet --force
  "$PY" -m spinestream.cli shard --data "$raw" --out "$SHARDS" --set image_size="$DATA_SIZE" --set folds=2 \
      --set shard_max_samples="$SHARD_SAMPLES" --workers "$(nproc 2>/dev/null || echo 2)"
}

gpu_tests() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  "$PY" -c "import pytest" 2>/dev/null || { echo "pytest is not installed here"; return 3; }
  "$PY" -m pytest -m gpu $GPU_TESTS -p no:cacheprovider "${PYTEST_MODE[@]}" "${extra[@]}" \
      --junitxml "$OUT/gpu-tests/junit.xml"
  local rc=$?
  "$PY" - "$OUT/gpu-tests" "$rc" <<'PYEOF'
import json, os, re, sys
import xml.etree.ElementTree as ET
d, rc = sys.argv[1], int(sys.argv[2])
tests = {}
try:
    for case in ET.parse(os.path.join(d, "junit.xml")).iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kids = {c.tag for c in case}
        tests[tid] = ("failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed")
except (OSError, ET.ParseError):
    pass
# the slots of issue 9, filled from the tests whose names match (written by other issues)
slots = {"sync_debug": r"sync", "dali_checkpoint": r"checkpoint", "clahe_gpu_vs_cpu": r"clahe",
         "kill_and_resume": r"resume|kill"}
out = {"pytest_rc": rc, "tests": tests, "slots": {}}
for slot, pat in slots.items():
    hit = {t: o for t, o in tests.items() if re.search(pat, t, re.I)}
    status = ("missing" if not hit else "failed" if "failed" in hit.values()
              else "passed" if "passed" in hit.values() else "skipped")
    out["slots"][slot] = {"status": status, "tests": hit}
json.dump(out, open(os.path.join(d, "gpu_tests.json"), "w"), indent=1)
print(json.dumps(out["slots"], indent=1))
PYEOF
  # pytest's 5 = nothing collected: no gpu test exists yet, which the slots say as "missing"
  [ "$rc" = 5 ] && return 0
  return "$rc"
}

bench_train() {  # PRECISION LAYOUT
  local cl=$([ "$2" = cl ] && echo true || echo false)
  "$PY" -m spinestream.cli bench train -c configs/round1.yaml --shards "$SHARDS" --results "$OUT/train-$1-$2" \
      --steps "$STEPS" --warmup "$WARMUP" "${TRAIN_SET[@]}" --set train.precision="$1" --set train.channels_last="$cl"
}

if [ "${1:-}" = --run ]; then shift; "$@"; exit $?; fi   # one step, in its own process

mkdir -p "$OUT/env" "$OUT/gpu-tests"
echo "device check: DRY_RUN=$DRY_RUN OUT=$OUT WORK=$WORK deadline ${DEADLINE_S}s"
step env 90 "$OUT/env/env.json" -- env_probe
[ "$DRY_RUN" = 1 ] || step setup 150 -- setup_wheels
step data "$T_DATA" -- make_data
step gpu-tests "$T_TESTS" "$OUT/gpu-tests/gpu_tests.json" -- gpu_tests
for p in $PRECISIONS; do
  for l in $LAYOUTS; do
    # the first layout of each precision first: both precisions are measured before the second layouts
    [ "$l" = "${LAYOUTS%% *}" ] && step "train-$p-$l" "$T_TRAIN" "$OUT/train-$p-$l/train.json" -- bench_train "$p" "$l"
  done
done
step loader "$T_LOADER" "$OUT/loader/loader.json" -- \
  "$PY" -m spinestream.cli bench loader --shards "$SHARDS" --results "$OUT/loader" "${LOADER_ARGS[@]}"
for p in $PRECISIONS; do
  for l in $LAYOUTS; do
    [ "$l" = "${LAYOUTS%% *}" ] || step "train-$p-$l" "$T_TRAIN" "$OUT/train-$p-$l/train.json" -- bench_train "$p" "$l"
  done
done

"$PY" - "$OUT" "$START" <<'PYEOF'
import glob, json, os, sys, time
out, start = sys.argv[1], int(sys.argv[2])
steps = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    if os.path.basename(f) == "summary.json":
        continue
    d = json.load(open(f))
    steps[d["step"]] = {k: d[k] for k in ("rc", "ok", "timed_out", "seconds", "result") if k in d}
    if "skipped" in d:
        steps[d["step"]]["skipped"] = d["skipped"]
figures = {}
for f in sorted(glob.glob(os.path.join(out, "figures", "*.json"))):
    try:
        figures[os.path.basename(f)[:-5]] = json.load(open(f))
    except ValueError as e:
        figures[os.path.basename(f)[:-5]] = {"unreadable": str(e)}
doc = {"dry_run": os.environ.get("DRY_RUN", "0") == "1", "seconds": time.time() - start,
       "ok": all(s["ok"] for s in steps.values()), "steps": steps, "figures": figures}
tmp = os.path.join(out, ".summary.json.tmp")
json.dump(doc, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
print(f"summary: {sum(s['ok'] for s in steps.values())}/{len(steps)} steps ok in {doc['seconds']:.0f}s "
      f"-> {os.path.join(out, 'summary.json')}")
for name, s in steps.items():
    print(f"  {name:22s} {'ok' if s['ok'] else 'FAILED' if not s.get('skipped') else 'skipped'}  rc={s['rc']}")
PYEOF
