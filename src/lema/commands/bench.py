"""`lema bench`: Transformers + PEFT, LEMA RESIDENT and LEMA STREAMING side by side (lema/bench.py)."""

from __future__ import annotations

from typing import Optional

from . import add_layer_placement_flags, count_or_auto, tristate

HELP = "time training steps of Transformers + PEFT, LEMA RESIDENT and LEMA STREAMING side by side"
EXAMPLE = "lema bench --shape smollm2-135m --batch-size 4 --seq-len 256 --steps 10"
# issue 6: the planner's predicted peak and the measured one must agree within this
PREDICTION_TOLERANCE = 0.10


def add_arguments(parser) -> None:
    from ..contenders import CONTENDERS
    from ..shapes import SHAPES

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="FOLDER", help="a Transformers checkpoint folder with weights")
    src.add_argument("--shape", choices=list(SHAPES),
                     help="a random-weight model of this shape, built once in the cache folder")
    parser.add_argument("--cache-dir", default=None,
                        help="where --shape models are built (default: $LEMA_CACHE_DIR or ~/.cache/lema)")
    parser.add_argument("--steps", type=int, default=5, help="measured rounds (default: 5), after 1 warm-up step")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: float32)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16), on every linear layer")
    parser.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                        help="modules to adapt (default: every linear layer inside the decoder layers)")
    parser.add_argument("--num-buffers", type=int, default=3, help="LEMA's ring depth (default: 3)")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=None,
                        help="which to run (default: all three; only streaming when the weights exceed RAM)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per contender (default: all)")
    parser.add_argument("--keep-activations", type=count_or_auto, default=None, metavar="auto|N",
                        help="LEMA: layers keeping their activations instead of recomputing "
                             "(default: the planner's choice, as in training; 0: recompute all)")
    parser.add_argument("--chunked-loss", type=tristate, default=None, metavar="auto|on|off",
                        help="LEMA: head + loss in chunks (default auto: when the logits pass 64 MiB)")
    add_layer_placement_flags(parser)  # LEMA contenders (resident layers: LEMA STREAMING)
    parser.add_argument("--max-vram", default=None, metavar="SIZE",
                        help="LEMA: the memory budget its plan must fit (bounds the kept activations); "
                             "on the CPU it bounds anonymous memory")
    parser.add_argument("--page-cache", default=None, metavar="auto|off|SIZE",
                        help="LEMA STREAMING (but CUDA zero-copy): the page-cache window the pager holds "
                             "(default auto: on when the layers' file bytes exceed the available memory)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where every contender runs (default: cpu); on cuda the peak is device memory and "
                             "the ceiling a pinned host-to-device copy loop")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="CUDA: emulate a card of this size (torch.cuda.set_per_process_memory_fraction), "
                             "e.g. 16GB")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the floor: compute time of the step (1- and 4-layer models in RAM, "
                             "timed in the same interleaved rounds, scaled to all layers) and disk-read time "
                             "of the bytes read per step")
    parser.add_argument("--profile", default=None, metavar="TRACE.json",
                        help="after timing, profile one step of each contender (torch.profiler Chrome trace; "
                             "TRACE-<contender>.json when several)")
    parser.add_argument("--memory-peak", action="store_true",
                        help="CUDA: after timing, one more step of each contender with the allocator's history "
                             "recorded, and what was live at its peak, by where it was allocated")
    parser.add_argument("--exact-memory", action="store_true",
                        help="run the contenders with glibc's MALLOC_MMAP_THRESHOLD_=131072, so freed tensors go "
                             "back to the OS and the peak RssAnon is the peak of live tensors (to compare with the "
                             "planner); slower, every large allocation is a fresh mmap")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _mem_total() -> int:
    from ..host_memory import proc_bytes

    return proc_bytes("/proc/meminfo", "MemTotal")


def run(args) -> int:
    import json
    import os
    import platform
    import statistics
    import sys

    import torch

    from .. import bench, contenders, measure, shapes
    from ..config import parse_dtype
    from ..config import LemaConfig, parse_bytes
    from ..plan_bytes import model_facts
    from ..plan_table import human
    from ..planner import plan, plan_for_config

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    for name in ("steps", "batch_size", "seq_len", "lora_rank", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    from .plan import page_cache

    page_cache(args.page_cache)  # named here, not in a contender's process
    dtype = parse_dtype(args.dtype)
    cuda = args.device == "cuda"
    if args.memory_peak and not cuda:
        raise ValueError("--memory-peak reads CUDA's allocator history; use it with --device cuda (on the CPU, "
                         "--exact-memory makes the peak RssAnon the peak of live tensors)")
    if args.gpu_memory is not None and not cuda:
        raise ValueError("--gpu-memory emulates a smaller card with CUDA's memory fraction; use it with --device cuda")
    if args.profile:  # the trace is written after every timed round: a folder it cannot go to is named now
        from ..fsutil import check_writable

        check_writable(os.path.dirname(os.path.abspath(args.profile)) or ".", f"--profile {args.profile!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available here (no GPU, or a CPU-only PyTorch); "
                         "use --device cpu")
    if args.shape and args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise ValueError(f"--cache-dir {args.cache_dir!r} is a file; give a folder for the random models")
    if args.shape:
        log(f"model: random weights of shape {args.shape} ({args.dtype}) ...")
        folder = shapes.build_shape(args.shape, args.cache_dir, dtype, log=log, device=args.device)
    else:
        from ..engine.skeleton import load_hf_config

        folder = args.model
        load_hf_config(folder)  # a missing folder or an unknown architecture is named before anything runs
    from ..store import WeightStore, weight_files

    files = weight_files(folder)  # as the contenders open them; WeightsFileError (naming the fix) if none
    WeightStore(folder).close()  # every file's header and size checked (a truncated file named) before any runs
    weight_bytes = sum(os.path.getsize(f) for f in files)
    big = weight_bytes > 0.6 * _mem_total()
    if not cuda:  # the contenders' processes, started below: no huge pages when the weights fill the RAM
        from ..host_memory import no_huge_pages_in_children

        no_huge_pages_in_children(weight_bytes)
    names = args.contenders or (["streaming"] if big else list(contenders.CONTENDERS))
    if big and not args.contenders:
        log(f"weights are {human(weight_bytes)}, more than this machine's RAM allows resident: "
            "running LEMA STREAMING only")

    # The ceiling: what reading the weights can deliver here (CPU: a sequential file read;
    # from the page cache when the model fits in RAM, from the disk when it does not).
    if cuda:
        ceiling = measure.h2d_ceiling(torch.device("cuda"))
        ceiling_kind = "pinned host-to-device copy"
    else:
        ceiling = measure.read_ceiling(files[0], cold=big)
        ceiling_kind = "disk (cold sequential read)" if big else "page cache (warm sequential read)"


    if args.gpu_memory and not args.max_vram:  # LEMA plans for the emulated card, not the real one's free memory
        args.max_vram = args.gpu_memory
    facts = model_facts(folder, dtype, args.lora_rank, args.lora_target_modules)  # the slow part of a plan: once
    # The floor probes time recomputed and/or kept layers, as LEMA STREAMING will run them.
    expected = plan_for_config(LemaConfig(model_name_or_path=folder, dtype=args.dtype, lora_rank=args.lora_rank,
                                          lora_target_modules=args.lora_target_modules, num_buffers=args.num_buffers,
                                          keep_activations=args.keep_activations, chunked_loss=args.chunked_loss,
                                          resident_layers=args.resident_layers or 0,
                                          offload_activations=args.offload_activations,
                                          max_vram=args.max_vram, device=args.device,
                                          zero_copy=args.zero_copy,
                                          # a page-cache size stages a GPU's copies: the split's time model with them
                                          page_cache=None if args.page_cache == "auto" else args.page_cache),
                               args.batch_size, args.seq_len, facts=facts, auto_resident=args.resident_layers is None)
    args.resident_layers = expected.resident_layers  # as `lema train` decides it (auto: the plan's split)
    spec = contenders.BenchSpec(model=folder, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                                lora_rank=args.lora_rank, targets=args.lora_target_modules,
                                num_buffers=args.num_buffers,
                                keep_activations=args.keep_activations, chunked_loss=args.chunked_loss,
                                resident_layers=args.resident_layers, offload_activations=args.offload_activations,
                                zero_copy=args.zero_copy,
                                page_cache=None if args.page_cache == "auto" else args.page_cache,
                                max_vram=args.max_vram, device=args.device,
                                device_memory=parse_bytes(args.gpu_memory))
    floor_names = bench.floor_probes(expected.kept_layers, expected.num_layers) if args.floor else []
    if args.exact_memory:  # read by glibc when each contender's process starts (spawn)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    # A model bigger than the RAM: the probes (GBs in RAM) run only in their turn, not taking the page cache the
    # streamed run holds its window in (on a GPU their memory is the device's, not the host's page cache).
    transient = tuple(floor_names) if big and not cuda else ()
    gemm_rates = []

    def measure_gemm() -> None:
        """The compute ceiling, one large product's FLOP/s on the contenders' threads, after each round (this VM's
        cores changed speed by a third within minutes): the step's FLOPs over the best of them is its compute floor."""
        saved = torch.get_num_threads()
        torch.set_num_threads(args.threads or saved)
        try:
            gemm_rates.append(measure.gemm_ceiling(args.device, dtype, repeats=3))
        finally:
            torch.set_num_threads(saved)

    results, workers = bench.run_rounds(names + floor_names, spec, args.steps, threads=args.threads, log=log,
                                        transient=transient, between_rounds=measure_gemm)
    gemm = max(gemm_rates)
    try:
        tables = bench.profile_contenders({n: workers[n] for n in names}, args.profile) if args.profile else {}
        peaks = bench.memory_peaks({n: workers[n] for n in names}) if args.memory_peak else {}
    finally:
        for w in workers.values():
            w.close()
    floor = None
    if args.floor:
        kept = results["streaming"].info.get("kept_layers", 0) if "streaming" in results else expected.kept_layers
        floor = bench.floor_from_rounds(folder, results, kept)
    for n in floor_names:
        results.pop(n)
    predicted, modelled = {}, {}
    for n in names:  # the plan of what each contender did (its kept layers and loss, as it decided them)
        info = results[n].info
        p = plan(folder, dtype, args.lora_rank, args.lora_target_modules, "adamw", args.batch_size, args.seq_len,
                 parse_bytes(args.max_vram), args.device, args.num_buffers, "streaming" if n == "streaming" else "resident",
                 # LEMA on the CPU decides views as the plan does (the file's dtype, tensors stored as used); on a
                 # GPU, what the contender did (registration may fail)
                 zero_copy=False if n == "peft" else info.get("zero_copy") if cuda else args.zero_copy,
                 keep_activations=info.get("kept_layers", 0),
                 chunked_loss=info.get("chunked_loss", False),
                 gradient_checkpointing=True, page_cache=info.get("page_cache_window"),
                 resident_layers=args.resident_layers if n == "streaming" else 0,
                 offload_activations=info.get("offload_activations", False), facts=facts,
                 # Transformers maps a file already in the compute dtype (no copy: checked with RssAnon on SmolLM2,
                 # the gpt2-124m and a 4-layer 7B shape) and copies it only to cast it
                 weights_mapped=n == "peft" and not cuda and facts.file_dtype == dtype,
                 host_allocator=False if n == "peft" else None)  # LEMA's CPU allocator runs in LEMA's processes
        predicted[n] = p.peak_bytes
        modelled[n] = p.modelled_s
        if info.get("page_cache_window"):  # the disk bytes the pager's window implies, against what was read
            info["predicted_disk_bytes_per_step"] = p.disk_read_bytes

    tokens = args.batch_size * args.seq_len
    ref = {k: results[k].median for k in ("peft", "resident") if k in results}
    out = {
        "date": __import__("datetime").date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {human(_mem_total())} RAM, "
                   f"torch {torch.__version__}",
        "command": "lema " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else None,
        "model": folder, "weights_bytes": weight_bytes, "dtype": args.dtype, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lora_rank": args.lora_rank, "steps": args.steps,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "ceiling_bytes_per_s": ceiling, "ceiling_kind": ceiling_kind, "gemm_ceiling_flops_per_s": gemm,
        "gemm_by_round_flops_per_s": gemm_rates,
        "device": args.device,
        "gpu_memory": args.gpu_memory, "max_vram": args.max_vram,
        "contenders": {},
    }

    def by_round(r, other: str) -> Optional[float]:
        """The median over the rounds of this contender's step over `other`'s in the same round: the two ran
        minutes apart, so drift in the machine between rounds cancels (the medians' ratio keeps some of it)."""
        if other not in results or not r.times:
            return None
        return statistics.median(t / o for t, o in zip(r.times, results[other].times) if o > 0)

    for n, r in results.items():
        peak_run = r.peak_rss - r.baseline_rss
        gbps = r.bytes_per_step / r.median if r.median else 0.0
        # Transformers + PEFT recomputes every layer (gradient checkpointing); LEMA those it does not keep
        flops = measure.step_flops(facts, dtype, args.batch_size, args.seq_len,
                                 facts.L - r.info.get("kept_layers", 0) if n != "peft" else facts.L)
        out["contenders"][n] = {
            "label": r.label, "median_step_s": r.median, "step_times_s": r.times,
            "tokens_per_s": tokens / r.median, "losses": r.losses,
            "peak_anon_bytes": r.peak_rss, "baseline_anon_bytes": r.baseline_rss, "peak_run_bytes": peak_run,
            "predicted_peak_bytes": predicted[n],
            "predicted_over_measured": predicted[n] / peak_run if peak_run > 0 else None,
            "prediction_within_10pct": bool(peak_run > 0 and abs(predicted[n] / peak_run - 1) <= PREDICTION_TOLERANCE),
            "bytes_streamed_per_step": r.bytes_per_step, "disk_bytes_read_per_step": r.disk_bytes_per_step,
            "achieved_bytes_per_s": gbps, "achieved_over_ceiling": gbps / ceiling if ceiling else None,
            "vs_peft": r.median / ref["peft"] if "peft" in ref else None,
            "vs_resident": r.median / ref["resident"] if "resident" in ref else None,
            "vs_peft_by_round": by_round(r, "peft"), "vs_resident_by_round": by_round(r, "resident"),
            "flops_per_step": flops, "flops_per_s": flops / r.median if r.median else None,
            "over_compute_ceiling": r.median * gemm / flops if flops and gemm else None,
            "build_s": r.build_s, **r.info,
        }
        if r.peak_allocated is not None and r.baseline_allocated is not None:
            # malloc's bytes in use at the peak, above the baseline: what the tensors held, as the GPU's
            # max_memory_allocated; RssAnon also holds the freed blocks glibc's heap keeps (no budget)
            allocated = r.peak_allocated - r.baseline_allocated
            out["contenders"][n].update(
                peak_allocated_bytes=r.peak_allocated, peak_run_allocated_bytes=allocated,
                predicted_over_allocated=predicted[n] / allocated if allocated > 0 else None,
                allocated_prediction_within_10pct=bool(
                    allocated > 0 and abs(predicted[n] / allocated - 1) <= PREDICTION_TOLERANCE))
        if r.timelines and len(r.timelines) == len(r.times):  # the median step's (the one closest to it)
            i = min(range(len(r.times)), key=lambda k: abs(r.times[k] - r.median))
            out["contenders"][n]["layers"] = r.timelines[i]
    if "streaming" in out["contenders"]:
        out["contenders"]["streaming"]["resident_layers"] = args.resident_layers
        if modelled.get("streaming"):  # the planner's time model (GPU), to hold against the measured step
            out["contenders"]["streaming"]["modelled_stream_s"], out["contenders"]["streaming"]["modelled_compute_s"] \
                = modelled["streaming"]
    if floor is not None and "streaming" in results:
        s = out["contenders"]["streaming"]
        # the transfer floor: on the GPU every streamed byte crosses the bus; on the CPU what came off the disk
        moved = s["bytes_streamed_per_step"] if cuda else s["disk_bytes_read_per_step"]
        rate = ceiling
        t = s.get("layers") or {}
        if not cuda and t.get("read_s"):
            # The pager's own reads in the median step (a populate at a time, cached pages counted as read) show
            # a rate the disk did deliver: when it beats the probe before the rounds (this VM's disk has run at
            # 0.21 to 1.7 GB/s within an hour), the probe missed it. Only ever lowers the disk floor.
            floor["pager_read_bytes_per_s"] = t["read_bytes"] / t["read_s"]
            rate = max(rate, floor["pager_read_bytes_per_s"])
        floor["disk_bytes_per_s"] = rate
        disk_s = floor["moved_s"] = moved / rate if rate else 0.0  # on a GPU the bus, on the CPU the disk
        if cuda and s["disk_bytes_read_per_step"] > 0.05 * s["bytes_streamed_per_step"]:
            # a GPU host whose page cache does not hold the layers (or a --page-cache window): the disk is the
            # other transfer, its rate measured now, after the rounds (a cold read: its range dropped first); not
            # for a few stray reads (5% of the streamed bytes or less), which would not set the pace
            floor["disk_read_bytes_per_s"] = measure.read_ceiling(files[0], cold=True)
            floor["disk_read_s"] = s["disk_bytes_read_per_step"] / floor["disk_read_bytes_per_s"]
            disk_s = max(disk_s, floor["disk_read_s"])
        floor_s = max(disk_s, floor["compute_s"])
        if cuda:  # issue 6's definition: every layer's weights cross the bus twice (forward, backward)
            layers = sum(b for u, b in expected.unit_bytes.items() if u.startswith("layer."))
            floor["two_passes_s"] = 2 * layers / ceiling if ceiling else 0.0
        # The target is the median over the floor. The floor's probes are each the fastest of their steps, so
        # the fastest streamed step over the floor is printed beside it: the same estimator on both sides.
        # And round by round: each streamed step over the floor of the probes timed in the same round. Drift in
        # the machine between rounds (this VM's steps have changed by a third within a run) then hits both sides;
        # the median/fastest figures above take the floor from the fastest round.
        by_round = [t / max(disk_s, c) for t, c in zip(s["step_times_s"], floor.get("compute_by_round_s", []))
                    if max(disk_s, c) > 0]
        out["floor"] = dict(floor, disk_s=disk_s, floor_s=floor_s,
                            streaming_over_floor=s["median_step_s"] / floor_s if floor_s else None,
                            fastest_streaming_over_floor=min(s["step_times_s"]) / floor_s if floor_s else None,
                            streaming_over_floor_by_round=by_round,
                            median_round_streaming_over_floor=statistics.median(by_round) if by_round else None)
    if tables:
        out["profile_tables"] = tables
    if peaks:
        out["memory_peak"] = peaks
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(out))
        for n, t in tables.items():
            print(f"\nprofile, {contenders.LABELS[n]} (self CPU time, top 15):\n{t}")
        for n, found in peaks.items():
            print(f"\n{format_memory_peak(contenders.LABELS[n], found, predicted.get(n))}")
    return 0


def format_memory_peak(label: str, found: dict, predicted: Optional[int] = None) -> str:
    """measure.peak_allocations' result as lines: the peak, what was allocated before the step, and the groups."""
    from ..plan_table import human

    lines = [f"memory at the peak, {label}: {found['peak_bytes']:,} B allocated (torch's max_memory_allocated "
             f"{found['max_memory_allocated']:,} B" + (f"; the plan {predicted:,} B" if predicted else "") + ")",
             f"  {found['before_step_live_bytes']:>15,} B  allocated before the step (weights, adapters, "
             "optimizer state, ...), still live"]
    for g in found["groups"]:
        sizes = ", ".join(human(x) for x in g["sizes"])
        lines.append(f"  {g['bytes']:>15,} B  {g['count']:>4} block(s) of {sizes}: {g['where']}")
    return "\n".join(lines)


def format_table(out: dict) -> str:
    from ..plan_table import human

    gb = 1e9
    cuda = out.get("device") == "cuda"
    lines = [f"lema bench: {out['model']} ({human(out['weights_bytes'])}), {out['dtype']}, batch {out['batch_size']}"
             f" x seq {out['seq_len']}, LoRA r{out['lora_rank']}, AdamW; {out['steps']} interleaved rounds",
             f"machine: {out['machine']}; ceiling: {out['ceiling_bytes_per_s'] / gb:.2f} GB/s, {out['ceiling_kind']}",
             ""]
    hdr = (f"{'contender':<20} {'median s':>9} {'tok/s':>8} {'peak anon':>10} {'run peak':>10} {'predicted':>10}"
           f" {'pred/run':>8} {'streamed/step':>13} {'GB/s':>6} {'/ceil':>6} {'x PEFT':>7} {'x RESID':>7}")
    lines += [hdr, "-" * len(hdr)]
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for c in out["contenders"].values():
        lines.append(f"{c['label']:<20} {c['median_step_s']:>9.3f} {c['tokens_per_s']:>8.0f} "
                     f"{human(c['peak_anon_bytes']):>10} {human(c['peak_run_bytes']):>10} "
                     f"{human(c['predicted_peak_bytes']):>10} {f(c['predicted_over_measured'], '.2f'):>8} "
                     f"{human(c['bytes_streamed_per_step']):>13} {c['achieved_bytes_per_s'] / gb:>6.2f} "
                     f"{f(c['achieved_over_ceiling'], '.2f'):>6} {f(c['vs_peft'], '.2f'):>7} "
                     f"{f(c['vs_resident'], '.2f'):>7}")
    paired = [f"{c['label']} {f(c.get('vs_peft_by_round'), '.2f')} x PEFT, {f(c.get('vs_resident_by_round'), '.2f')} "
              "x RESIDENT" for n, c in out["contenders"].items() if n not in ("peft", "resident")
              and (c.get("vs_peft_by_round") is not None or c.get("vs_resident_by_round") is not None)]
    if paired:
        lines.append("round by round (median of each step over the other's in the same round): " + "; ".join(paired))
    lines.append("")
    for c in out["contenders"].values():
        if "kept_layers" in c:
            lines.append(f"{c['label']}: "
                         + (f"{c['resident_layers']} layers resident (loaded once), " if c.get("resident_layers") else "")
                         + f"{c['kept_layers']} layers kept their activations (the rest recomputed), "
                         f"loss {'chunked' if c['chunked_loss'] else 'on full logits'}"
                         + ((", layers copied from the registered page cache" if cuda else ", weights as mmap views")
                            if c.get("zero_copy") else "")
                         + (f", page-cache window {human(c['page_cache_window'])} held by the pager "
                            f"({c.get('pager_late_per_step', 0):.1f} layers per step not read ahead in time, "
                            f"{human(c.get('page_cache_evicted_per_step', 0))} per step of the window evicted by "
                            f"the kernel, {human(c.get('page_cache_shed_per_step', 0))} per step dropped early to keep "
                            f"memory free, window trimmed by {human(c.get('page_cache_trim', 0))}, lowest free "
                            f"memory in a step {human(c.get('page_cache_min_free', 0))}; "
                            f"disk reads per step: {human(c['predicted_disk_bytes_per_step'])} planned for the last "
                            f"step's window, {human(c['disk_bytes_read_per_step'])} measured)"
                            if c.get("page_cache_window") else "")
                         + (f", {c['cpu_allocator']['hits']} tensors of 64 KiB or more in a step on reused blocks and "
                            f"{c['cpu_allocator']['misses']} on new ones (LEMA's CPU allocator)"
                            if c.get("cpu_allocator") else ""))
    for c in out["contenders"].values():
        t = c.get("layers")
        if t and t["layer_runs"]:
            runs = t["layer_runs"] / 2 if t["backward_s"] else t["layer_runs"]
            mean = lambda k: "-" if t[k]["mean_s"] is None else f"{t[k]['mean_s']:.3f} s"  # noqa: E731
            lines.append(f"{c['label']}: where the median step went: layers forward {t['forward_s']:.2f} s "
                         f"({t['forward_s'] / runs:.3f} s a layer), backward {t['backward_s']:.2f} s "
                         f"({t['backward_s'] / runs:.3f} s a layer), outside the layers {t['outside_layers_s']:.2f} s "
                         f"(embedding, head and loss, optimizer), waiting for weights {t['wait_s']:.2f} s"
                         + (f"; a layer beside a page-cache read {mean('beside_read')} ({t['beside_read']['runs']} of "
                            f"them), the others {mean('alone')} ({human(t['read_bytes'])} read)" if t["read_bytes"] else ""))
        if c.get("flops_per_step") and out.get("gemm_ceiling_flops_per_s"):
            lines.append(f"{c['label']}: {c['flops_per_step'] / 1e12:.2f} TFLOP a step (counted from the shape), "
                         f"{c['flops_per_s'] / 1e9:.0f} GFLOP/s: {c['over_compute_ceiling']:.2f}x the step's FLOPs "
                         f"at the ceiling of one large product ({out['gemm_ceiling_flops_per_s'] / 1e9:.0f} GFLOP/s, "
                         "the best after a round)")
        timed = c.get("linear_orientations") or []
        if timed:
            lines.append(f"{c['label']}: frozen linears, product orientation per shape (torch's s, transposed s): "
                         + "; ".join(f"{w} {n}x{o}x{i} {'transposed' if pick else 'torch'} "
                                     f"({a * 1e3:.1f}, {b * 1e3:.1f} ms)" for w, n, o, i, a, b, pick in timed))
        if c.get("modelled_stream_s") is not None:
            lines.append(f"{c['label']}: the plan's time model (H200 rates) said streaming {c['modelled_stream_s']:.3f} s, "
                         f"compute {c['modelled_compute_s']:.3f} s per step; measured {c['median_step_s']:.3f} s")
        if c.get("cpu"):
            shares = {k: v for k, v in c["cpu"].items() if v >= 0.005}
            lines.append(f"{c['label']}: the machine's CPU during its steps: "
                         + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        if c.get("faults_per_step"):
            minor, major = c["faults_per_step"]
            lines.append(f"{c['label']}: page faults a step in its process (but the pager's thread): {minor:,.0f} minor, "
                         f"{major:,.0f} major")
        vm = c.get("vm_per_step") or {}
        if any(vm.values()):
            lines.append(f"{c['label']}: the kernel's memory work a step: kswapd reclaimed "
                         f"{human(vm.get('pgsteal_kswapd', 0))} ({human(vm.get('pgscan_kswapd', 0))} "
                         f"scanned), direct reclaim {human(vm.get('pgsteal_direct', 0))}, "
                         f"{vm.get('compact_stall', 0):.0f} compaction stalls, "
                         f"{human(vm.get('workingset_refault_file', 0))} of file pages read again")
    for c in out["contenders"].values():
        r = c.get("predicted_over_measured")
        if r is None:
            continue
        ok = c.get("prediction_within_10pct")
        why = ("" if ok or cuda or out.get("max_vram") else
               " (RssAnon also counts what glibc's heap keeps of freed blocks, unbounded without --max-vram)")
        line = (f"planner check, {c['label']}: predicted / run peak {r:.2f}, "
                f"{'within' if ok else 'OUTSIDE'} {PREDICTION_TOLERANCE:.0%}{why}")
        if c.get("predicted_over_allocated") is not None:
            line += (f"; predicted / peak allocated (malloc's bytes in use) {c['predicted_over_allocated']:.2f}, "
                     f"{'within' if c['allocated_prediction_within_10pct'] else 'OUTSIDE'} {PREDICTION_TOLERANCE:.0%}")
        lines.append(line)
    if out.get("device") == "cuda":
        lines.append("peak anon / run peak: here the peak of allocated device memory (torch.cuda.max_memory_allocated)"
                     + (f", on a {out['gpu_memory']} card emulated by a memory fraction" if out.get("gpu_memory") else ""))
    else:
        lines.append("peak anon: peak RssAnon of the contender's process; run peak: above its baseline after imports "
                     "(compared with the planner's predicted peak)")
    if "floor" in out:
        fl = out["floor"]
        s = out["contenders"]["streaming"]
        lines.append(f"floor: compute {fl['compute_s']:.2f} s, timed in the same rounds (probes: fastest of {fl.get('probe_repeats', 1)} steps x the rounds; rest {fl['t_rest']:.2f} s + "
                     f"{fl['kept_layers']} kept x {fl['t_layer_kept']:.3f} s + the others x {fl['t_layer']:.3f} s), {'PCIe' if out.get('device') == 'cuda' else 'disk'} {fl.get('moved_s', fl['disk_s']):.2f} s "
                     f"({human(s['bytes_streamed_per_step' if out.get('device') == 'cuda' else 'disk_bytes_read_per_step'])}"
                     " moved per step "
                     f"at {fl.get('disk_bytes_per_s', out['ceiling_bytes_per_s']) / gb:.2f} GB/s"
                     + (f": the pager's own reads ran at {fl['pager_read_bytes_per_s'] / gb:.2f} GB/s, the ceiling probe "
                        f"{out['ceiling_bytes_per_s'] / gb:.2f}" if fl.get("pager_read_bytes_per_s") else "")
                     + f") -> floor {fl['floor_s']:.2f} s; STREAMING "
                     f"is {fl['streaming_over_floor']:.2f}x the floor (median step; its fastest step "
                     f"{fl['fastest_streaming_over_floor']:.2f}x)"
                     + (f"; round by round, against the probes of the same round: median "
                        f"{fl['median_round_streaming_over_floor']:.2f}x ("
                        + ", ".join(f"{x:.2f}" for x in fl["streaming_over_floor_by_round"]) + ")"
                        if fl.get("streaming_over_floor_by_round") else "")
                     + (f"; every layer's weights twice over the ceiling: {fl['two_passes_s']:.2f} s"
                        if "two_passes_s" in fl else "")
                     + (f"; the disk: {human(s['disk_bytes_read_per_step'])} read per step at "
                        f"{fl['disk_read_bytes_per_s'] / gb:.2f} GB/s (a cold sequential read after the rounds), "
                        f"{fl['disk_read_s']:.2f} s" if "disk_read_s" in fl else "")
                     + ("; page faults a step in the probes' processes: " + ", ".join(
                         f"{n} {f[0]:,.0f} minor, {f[1]:,.0f} major" for n, f in fl["probe_faults_per_step"].items())
                        if fl.get("probe_faults_per_step") else ""))
    return "\n".join(lines)
