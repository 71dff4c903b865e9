#!/usr/bin/env bash
# The step, memory and serving benchmarks at the sizes of one GPU or TPU host, one table out.
#
# For every variant x batch x dtype x attention kernel it runs
#   train_step.py  (VPT-deep and full fine-tuning: img/s, XLA GFLOP per image),
#   memory.py      (the compiled step's device bytes, remat none and block, no run),
#   serving.py     (19 VPT-deep tasks on one backbone: forward img/s),
# writes each output to --out, and prints one markdown table merged from them
# (benchmarks/accelerator_table.py). A failed run (e.g. out of memory at L/16,
# batch 256, float32) is a row saying so; the others still run.
#
#   benchmarks/accelerator.sh                       # B/16 and L/16, batch 64 and 256, ...
#   benchmarks/accelerator.sh --dry_run             # print the commands only
#   benchmarks/accelerator.sh --variants B/16 --batches 128 --dtypes bfloat16
#
# Options (space-separated lists):
#   --variants "B/16 L/16"   --batches "64 256"   --dtypes "float32 bfloat16"
#   --attentions "einsum dot_product"   --methods vpt_deep,full   --steps 5
#   --image_size 224   --out DIR (default: a new temp dir)   --python PY   --dry_run
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
variants="B/16 L/16"
batches="64 256"
dtypes="float32 bfloat16"
attentions="einsum dot_product"
methods="vpt_deep,full"
steps=5
image_size=224
out=""
python="${PYTHON:-python}"
dry_run=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --variants) variants="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --dtypes) dtypes="$2"; shift 2 ;;
    --attentions) attentions="$2"; shift 2 ;;
    --methods) methods="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --image_size) image_size="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "accelerator.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# One line per run: "<tag>\t<command>"; the tag names the run in the table.
commands=()
for variant in $variants; do
  for batch in $batches; do
    for attention in $attentions; do
      for dtype in $dtypes; do
        commands+=("train_step variant=$variant batch=$batch dtype=$dtype attention=$attention	$python $here/train_step.py --variant $variant --image_size $image_size --batch_size $batch --methods $methods --steps $steps --dtype $dtype --attention $attention")
        commands+=("serving variant=$variant batch=$batch dtype=$dtype attention=$attention	$python $here/serving.py --variant $variant --image_size $image_size --batch_size $batch --runs $steps --dtype $dtype --attention $attention")
      done
      for method in ${methods//,/ }; do
        commands+=("memory variant=$variant batch=$batch method=$method attention=$attention	$python $here/memory.py --variants $variant --image_size $image_size --batch_size $batch --method $method --dtypes ${dtypes// /,} --remats none,block --attention $attention")
      done
    done
  done
done

if ((dry_run)); then
  for line in "${commands[@]}"; do echo "${line#*	}"; done
  exit 0
fi

out="${out:-$(mktemp -d /tmp/accelerator.XXXXXX)}"
mkdir -p "$out"
echo "logs in $out" >&2
index=0
for line in "${commands[@]}"; do
  index=$((index + 1))
  tag="${line%%	*}"
  command="${line#*	}"
  log="$out/$(printf '%03d' "$index").log"
  echo "[$index/${#commands[@]}] $command" >&2
  {
    echo "## $tag"
    if $command; then echo "## status ok"; else echo "## status failed ($?)"; fi
  } >"$log" 2>&1
done
"$python" "$here/accelerator_table.py" "$out"/*.log
