#!/usr/bin/env bash
# The figures slimjax records on a GPU host, in one run that fits a short lease, most wanted first:
#   the population executor against the sequential one (LeNet-300-100, then LeNet-5), fit in
#   scanned blocks against one call per step (finetune's GPU default), supernet
#   evaluation vmapped against one by one, the quickstart's training throughput (StableHLO export
#   only: TensorFlow is not needed), one GP batch of q=64 suggestions, the lr x wd population
#   reproduction at 4 x 4, and which TensorRT / onnxruntime GPU providers the machine has.
# Each step runs in its own process under a share of an overall deadline, so a failing or slow
# step loses only itself; everything is appended to OUTDIR/all.log and a summary is printed last.
# Run directories go to a temporary folder; OUTDIR gets at most five files (the log, the
# quickstart's report.json, the lr x wd results.json).
#
# Usage (repository root, slimjax installed with `pip install -e .`):
#   experiments/benchmarks/gpu_checks.sh OUTDIR [SECONDS [STEP ...]]
# SECONDS: overall deadline (default 420); STEPs: run only these (default: the first seven below).
# More steps: nas_eval_highest (TF32 off), population_lenet300_free / population_lenet5_free (the
# ascending search without its measuring budget: session 18's comparison), profile_population
# (cProfile of a K=8 benchmark, to OUTDIR/population.prof), prune_masks (a mask update's selection:
# the GPU's sort against the CPU's bisection, up to a 4096x1024 leaf), population_prune (a prune
# stage vmapped over 32 trials with its step counters batched vs unbatched), population_decompose
# (16 decompose stages of different ranks fine-tuned together, padded, vs alone vs sequential),
# decompose_budget (a budget's bisection with the SVDs once vs per step; host-side numpy),
# population_distill / population_qat (8 distilled prune stages at 4 temperatures x 2 hard weights,
# 8 QAT stages at 4 bit widths x 2 learning rates: fine-tuned together vs alone vs sequential),
# population_overlap (cold sweeps of LeNet-5 with the population's program compiled in a background
# thread while the first trials train, against measured first and against sequential: overlap=True
# is off by default until this shows it pays beside an accelerator), population_rerun (cold sweeps
# again with a filled persistent compilation cache, the population's measured choice read back).
set -u
out=${1:?usage: gpu_checks.sh OUTDIR [SECONDS [STEP ...]]}
budget=${2:-420}
shift $(($# < 2 ? $# : 2))
only=" $* "
default=" environment population_lenet300 fit_blocks nas_eval quickstart gp_batch population_lenet5 population_lr_wd "
mkdir -p "$out"
log="$out/all.log"
: >"$log"
start=$(date +%s)
export PYTHONUNBUFFERED=1
# Several JAX processes may share the card (the cold sweeps of the population benchmark).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
summary=()
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT

step() {  # step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with min(LIMIT, time left) seconds
  local name=$1 limit=$2
  shift 2
  if [[ $only == "  " ]]; then [[ $default == *" $name "* ]] || return; elif [[ $only != *" $name "* ]]; then return; fi
  local left=$((budget - ($(date +%s) - start)))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    summary+=("$name: not run (${left}s left of ${budget}s)")
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0 rc
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  summary+=("$name: rc $rc in $(($(date +%s) - t0))s")
}

step environment 30 bash -c '
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__); print(jax.devices())"
  python3 -c "import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())"
  python3 -c "import tensorrt; print(\"tensorrt\", tensorrt.__version__)" || echo "tensorrt: not importable"
  ldconfig -p | grep -i -E "nvinfer|libnvonnxparser" || echo "no TensorRT libraries (libnvinfer) on the loader path"'
step population_lenet300 130 python3 -m experiments.benchmarks.population --models lenet300 --ks 1 8 32 128 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --no-cold
step fit_blocks 60 python3 -m experiments.benchmarks.fit_blocks --steps 1000 --repeats 2
step nas_eval 60 python3 -m experiments.benchmarks.nas_eval --ks 1 4 16 64 --repeats 5
step quickstart 90 python3 -m research.cli run configs/quickstart.py --set 'stages.export.formats=["stablehlo"]' \
  --set 'stages.export.quantize=[]' --workdir "$runs/quickstart" --overwrite
cp "$runs/quickstart/report.json" "$out/quickstart_report.json" 2>/dev/null &&
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); t = r['stages'][0]['metrics'];
print('quickstart train stage: %.1f steps/s, %.0f examples/s, %.1f s' % (t['train_steps_per_s'], t['train_examples_per_s'], r['stages'][0]['seconds']))" \
    "$out/quickstart_report.json" | tee -a "$log"
step gp_batch 75 python3 -m experiments.benchmarks.automl_gp_batch --n 300 --q 1,64 --repeats 3
step population_lenet5 120 python3 -m experiments.benchmarks.population --models lenet5 --ks 1 8 32 128 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --no-cold
step population_lr_wd 120 python3 -m experiments.population_lr_wd.main --lrs 4 --wds 4 --interleave --out "$runs/lr_wd"
cp "$runs/lr_wd/results.json" "$out/lr_wd_results.json" 2>/dev/null
step nas_eval_highest 45 python3 -m experiments.benchmarks.nas_eval --ks 16 64 --repeats 5 --calibrate \
  --precision highest
step population_lenet300_free 120 python3 -m experiments.benchmarks.population --models lenet300 --ks 8 32 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --no-cold --measure-budget none --search ascending --verbose
step profile_population 60 python3 -m cProfile -o "$out/population.prof" -m experiments.benchmarks.population \
  --models lenet300 --ks 8 --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --no-cold --measure-budget none
step prune_masks 60 python3 -m experiments.benchmarks.prune_masks --sizes 235200 589824 4194304 \
  --models lenet300 resnet20 --repeats 7 --no-pipeline
step population_prune 90 python3 -m experiments.benchmarks.population_prune --points 32 --chunk 32 --rounds 2
step population_decompose 120 python3 -m experiments.benchmarks.population_decompose --points 16 --chunk 16 --rounds 2
step decompose_budget 45 python3 -m experiments.benchmarks.decompose_budget --rounds 2
step population_distill 120 python3 -m experiments.benchmarks.population_kd_qat --stage distill --rounds 2
step population_qat 120 python3 -m experiments.benchmarks.population_kd_qat --stage qat --rounds 2
step population_lenet5_free 120 python3 -m experiments.benchmarks.population --models lenet5 --ks 8 32 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --no-cold --measure-budget none --search ascending --verbose
step population_overlap 150 python3 -m experiments.benchmarks.population --models lenet5 --ks 8 32 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --cold-repeats 1 --overlap
step population_rerun 150 python3 -m experiments.benchmarks.population --models lenet300 lenet5 --ks 32 \
  --steps 1000 --seq-trials 8 --repeats 1 --min-trials 1 --cold-repeats 1 --rerun

echo "=== summary (${budget}s budget, $(($(date +%s) - start))s used)" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
