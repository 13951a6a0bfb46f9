#!/usr/bin/env bash
# The GPU checks, as one command on a lent GPU machine (the device tool; never in CI):
#   bash scripts/gpu_check.sh DEADLINE_S STAGE...
# Stages, run in the order given, each skipped when it could not finish before DEADLINE_S:
#   tests   tests/test_cuda.py (streaming vs resident on CUDA, packed file, resident layers, offload)
#   probe   scripts/gpu_probe.py: matmul rate, pinned copy bandwidth, slot fill by reader threads
#   t5      target 5: TinyLlama-1.1B shape, b1 x 512, all three contenders, --floor
#   t5long  target 5 at 4096 tokens per step (b2 x 2048: the shape has 2048 positions)
#   t3      target 3: Llama-2-7B shape, b8 x 512, --max-vram 4GB, --floor
#   t4      target 4: Llama-2-7B shape, b1 x 512 --max-vram 2.5GB --num-buffers 2 --floor
#   t4long  target 4: b1 x 4096 in a 16 GB card, resident layers as training decides them (auto: the plan shares
#           the room between resident and kept layers by the step time each saves)
#   t4longr0  the same, every layer streamed (--resident-layers 0): the auto split's gain, side by side
#   t3b2    target 3 with --num-buffers 2 (386 MiB less at the peak; does a 7 ms zero-copy load still hide behind
#           a 19 ms layer with one slot ahead?)
#   t3mem   target 3, one step, and what is live at its peak by where it was allocated (--memory-peak: the 128.5
#           MiB the plan missed in session 18)
#   t3prof  target 3, one profiled step (torch.profiler: $OUT/prof-t3prof.json, the top CUDA kernels in the summary)
#   t3pc    target 3 staged with --page-cache 6GB: a host with less RAM than the model, emulated (the pager holds
#           15 of the 32 layers and drops the rest, so each step reads ~14 GB from the disk)
#   Zero-copy (layers copied from the page cache registered with CUDA, no pinned staging) is the CUDA default
#   where the layers fit in RAM (all stages but t3pc, whose --page-cache asks for the pager and so stages):
#   t5st, t5longst, t3st, t4st: the same staged through pinned slots (--zero-copy off), to run beside it
#   t5zc, t5longzc, t3zc, t4zc: the same with --zero-copy on (refused where it cannot apply)
# Targets 5 say "every layer streamed": their stages pass --resident-layers 0 (auto might keep some).
# Each stage's output goes to $OUT/<stage>.log (bench stages also $OUT/<stage>.json); a summary last.
set -u
DEADLINE=${1:?deadline in seconds}; shift
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LEMA_CACHE_DIR=${LEMA_CACHE_DIR:-/tmp/lema-cache}
PY=python3
BENCH="$PY -m lema bench --device cuda --gpu-memory 16GB --dtype bfloat16 --json"
declare -A NEED=([tests]=60 [probe]=30 [t5]=60 [t5long]=60 [t3]=80 [t4]=80 [t4long]=40 [t4longr0]=40 [t3pc]=80 [t3mem]=60 [t3prof]=60 [t3b2]=80
                 [t5zc]=60 [t5longzc]=60 [t3zc]=80 [t4zc]=80 [t5st]=60 [t5longst]=60 [t3st]=80 [t4st]=80)
declare -A LIMIT=([tests]=150 [probe]=60 [t5]=120 [t5long]=120 [t3]=200 [t4]=150 [t4long]=100 [t4longr0]=100 [t3pc]=200 [t3mem]=120 [t3prof]=120 [t3b2]=200
                  [t5zc]=120 [t5longzc]=120 [t3zc]=200 [t4zc]=150 [t5st]=120 [t5longst]=120 [t3st]=200 [t4st]=150)
summary=()

run_stage() {
    local name=$1 left=$((DEADLINE - SECONDS)) rc t0=$SECONDS limit
    if [ -z "${NEED[$name]:-}" ]; then summary+=("$name: unknown stage"); return; fi
    if (( left < ${NEED[$name]} )); then summary+=("$name: skipped (${left} s left)"); return; fi
    limit=$(( ${LIMIT[$name]} < left ? ${LIMIT[$name]} : left ))
    echo "=== $name (limit ${limit} s) ==="
    local zc=""
    local base=$name  # a bench stage's twin: its name + zc (--zero-copy on) or + st (--zero-copy off)
    case $name in
      t[345]*zc) zc="--zero-copy on"; base=${name%zc} ;;
      t[345]*st) zc="--zero-copy off"; base=${name%st} ;;
    esac
    case $base in
      tests)  timeout "$limit" $PY -m pytest -q -p no:cacheprovider -rfEs --tb=short tests/test_cuda.py \
                  >"$OUT/$name.log" 2>&1 ;;
      probe)  timeout "$limit" bash -c "$PY -c \"import torch; from lema.shapes import build_shape; \
build_shape('tinyllama-1.1b', dtype=torch.bfloat16, device='cuda')\" && $PY scripts/gpu_probe.py \
$LEMA_CACHE_DIR/shapes/tinyllama-1.1b-bfloat16/model.safetensors --json $OUT/probe.json" >"$OUT/$name.log" 2>&1 ;;
      t5)     timeout "$limit" $BENCH $zc --shape tinyllama-1.1b --batch-size 1 --seq-len 512 --steps 3 --floor \
                  --resident-layers 0 \
                  >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t5long) timeout "$limit" $BENCH $zc --shape tinyllama-1.1b --batch-size 2 --seq-len 2048 --steps 3 --floor \
                  --resident-layers 0 \
                  >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t3)     timeout "$limit" $BENCH $zc --shape llama-2-7b --max-vram 4GB --batch-size 8 --seq-len 512 --steps 3 \
                  --contenders streaming --floor >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t3b2)   timeout "$limit" $BENCH $zc --shape llama-2-7b --max-vram 4GB --num-buffers 2 --batch-size 8 \
                  --seq-len 512 --steps 3 --contenders streaming --floor >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t3mem)  timeout "$limit" $BENCH --shape llama-2-7b --max-vram 4GB --batch-size 8 --seq-len 512 --steps 1 \
                  --contenders streaming --memory-peak >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t3prof) timeout "$limit" $BENCH --shape llama-2-7b --max-vram 4GB --batch-size 8 --seq-len 512 --steps 1 \
                  --contenders streaming --profile "$OUT/prof-t3prof.json" >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t3pc)   timeout "$limit" $BENCH --shape llama-2-7b --max-vram 4GB --batch-size 8 --seq-len 512 --steps 3 \
                  --contenders streaming --floor --page-cache 6GB >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t4)     timeout "$limit" $BENCH $zc --shape llama-2-7b --max-vram 2.5GB --num-buffers 2 --batch-size 1 \
                  --seq-len 512 --steps 3 --contenders streaming --floor >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t4long) timeout "$limit" $BENCH $zc --shape llama-2-7b --batch-size 1 --seq-len 4096 --steps 3 \
                  --contenders streaming >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      t4longr0) timeout "$limit" $BENCH $zc --shape llama-2-7b --batch-size 1 --seq-len 4096 --steps 3 \
                  --contenders streaming --resident-layers 0 >"$OUT/$name.json" 2>"$OUT/$name.log" ;;
      *) echo "unknown stage $name"; return ;;
    esac
    rc=$?
    summary+=("$name: rc $rc in $((SECONDS - t0)) s")
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
for stage in "$@"; do run_stage "$stage"; done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
for f in "$OUT"/t*.json; do
    [ -s "$f" ] || continue
    $PY - "$f" <<'EOF'
import json, sys
try:
    o = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[1], "unreadable:", e); sys.exit()
print(sys.argv[1].rsplit("/", 1)[-1], f"ceiling {o['ceiling_bytes_per_s']/1e9:.1f} GB/s")
for n, c in o["contenders"].items():
    print(f"  {n:10s} median {c['median_step_s']:.3f} s {c['step_times_s']} peak {c['peak_anon_bytes']/1e9:.2f} GB "
          f"pred/meas {c['predicted_over_measured'] or 0:.2f} streamed {c['bytes_streamed_per_step']/1e9:.1f} GB "
          f"vs_peft {c['vs_peft']} kept {c.get('kept_layers')} resident {c.get('resident_layers')} "
          f"offload {c.get('offload_activations')} model stream/compute {c.get('modelled_stream_s')}/"
          f"{c.get('modelled_compute_s')}")
for n, m in (o.get("memory_peak") or {}).items():
    print(f"  memory at the peak, {n}: {m['peak_bytes']:,} B (max_memory_allocated {m['max_memory_allocated']:,}); "
          f"before the step {m['before_step_live_bytes']:,} B")
    for g in m["groups"]:
        print(f"    {g['bytes']:>14,} B  {g['count']:>4} x {g['sizes']}  {g['where']}")
for n, t in (o.get("profile_tables") or {}).items():
    print(f"  profile, {n}:\n{t}")
fl = o.get("floor")
if fl:
    print(f"  floor: compute {fl['compute_s']:.3f} s (layer {fl['t_layer']:.4f} kept {fl['t_layer_kept']:.4f} "
          f"rest {fl['t_rest']:.3f}), transfer {fl['disk_s']:.3f} s"
          + (f" (disk {fl['disk_read_s']:.3f} s at {fl['disk_read_bytes_per_s'] / 1e9:.2f} GB/s)" if "disk_read_s" in fl else "")
          + f" -> {fl['floor_s']:.3f} s; "
          f"streaming/floor {fl['streaming_over_floor']:.2f} (fastest {fl['fastest_streaming_over_floor']:.2f})")
EOF
done
# what comes back is at most 8 files of 16 MiB: the logs and JSON in one archive (first, so a call cut short while a
# big trace compresses still brings them), then a profiler trace compressed on its own (dropped if still too big)
tar -C "$OUT" --exclude='prof-*' -czf /tmp/gpu-logs.tgz . && mv /tmp/gpu-logs.tgz "$OUT/logs.tgz" \
    && find "$OUT" -maxdepth 1 \( -name '*.log' -o -name '*.json' -o -name '*.txt' \) ! -name 'prof-*' -delete
for f in "$OUT"/prof-*.json; do
    [ -e "$f" ] || continue
    gzip -f "$f"
    if [ "$(stat -c %s "$f.gz")" -gt $((15 * 2**20)) ]; then echo "$f.gz: over 15 MiB, not kept"; rm -f "$f.gz"; fi
done
