"""`lema bench`'s rounds: the contenders (contenders.py) timed side by side, and the floor from its probes.

The parent runs the contenders in interleaved rounds (one step each, in turn), so machine drift hits
all of them alike, and only one runs at a time. The floor's probes (a model of 1 and 4 layers in RAM)
run in the same rounds, so the floor's compute time is measured on the same machine as the steps.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

from .contenders import LABELS, BenchSpec, Worker


@dataclass
class ContenderResult:
    name: str
    label: str
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    bytes_per_step: int = 0
    disk_bytes_per_step: int = 0  # the median step's
    disk_reads: list[int] = field(default_factory=list)
    baseline_rss: int = 0
    peak_rss: int = 0
    baseline_allocated: Optional[int] = None  # malloc's bytes in use (CPU, glibc): after imports, and the peak
    peak_allocated: Optional[int] = None
    build_s: float = 0.0
    builds: int = 0  # processes built: 1, or one per round for a transient contender
    info: dict = field(default_factory=dict)  # LEMA contenders: kept_layers, chunked_loss
    timelines: list = field(default_factory=list)  # LEMA on the CPU: layer_timeline() of each measured step

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def run_rounds(names: list[str], spec: BenchSpec, steps: int, warmup: int = 1, threads: Optional[int] = None,
               log=print, transient: tuple[str, ...] = (), between_rounds=None
               ) -> tuple[dict[str, ContenderResult], dict[str, "Worker"]]:
    """Warm-up steps, then `steps` interleaved rounds: each contender one step per round, in turn; on the CPU,
    then one more step each, untimed, that measures the peak of malloc's bytes in use (PeakSampler).

    The `transient` contenders (the floor probes of a model bigger than the RAM) live for their turn only:
    built before it, their process ended after it, so that their memory is not taken from the page cache
    the streamed run holds its window in, as it is not in `lema train`. Before each of its steps a LEMA
    contender then reads back what the kernel evicted of its window for them (`PageCachePager.refill`,
    not timed): the step starts as a step of a training run does, with its window held."""
    import torch

    threads = threads or torch.get_num_threads()
    results = {n: ContenderResult(n, LABELS[n]) for n in names}
    workers: dict[str, Worker] = {}

    def start(n: str) -> None:
        workers[n] = Worker(n, spec, threads)

    def ready(n: str) -> None:
        info = workers[n].wait_ready()
        results[n].builds += 1
        if results[n].builds == 1:
            results[n].baseline_rss = info["baseline"]
            results[n].baseline_allocated = info.get("baseline_allocated")
            results[n].build_s = info["build_s"]
            results[n].info = {k: v for k, v in info.items() if k not in ("ok", "baseline", "baseline_allocated",
                                                                          "build_s")}

    try:
        log(f"building {', '.join(LABELS[n] for n in names if n not in transient)} (in parallel) ...")
        for n in names:  # builds overlap; steps never do
            if n not in transient:
                start(n)
        for n in names:
            if n not in transient:
                ready(n)
        warm = {n: {} for n in names}  # each contender's last warm-up reply: the pager's counts before the rounds
        for _ in range(warmup):
            for n in names:
                if n not in transient:  # a transient probe's fastest of PROBE_REPEATS steps skips its first
                    warm[n] = workers[n].request(op="step")
        for r in range(steps):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for n in order:
                if n in transient:
                    start(n)
                    ready(n)
                m = workers[n].request(op="step", reset_peak=False, repeat=PROBE_REPEATS if n.startswith("floor") else 1,
                                       refill=bool(transient))
                if n in transient:
                    workers.pop(n).close()
                res = results[n]
                res.times.append(m["time"])
                res.losses.append(m["loss"])
                res.bytes_per_step = m["bytes"]
                res.disk_reads.append(m["disk"])
                res.disk_bytes_per_step = int(statistics.median(res.disk_reads))
                res.peak_rss = max(res.peak_rss, m["peak"])
                if "layers" in m:
                    res.timelines.append(m["layers"])
                if "linear" in m:  # (pass, rows, out, in, torch's s, transposed s, pick) of each timed product shape
                    res.info["linear_orientations"] = m["linear"]
                if "allocator" in m:  # LEMA's CPU allocator: the last measured step's reuse
                    res.info["cpu_allocator"] = m["allocator"]
                if m.get("cpu"):  # the machine's CPU during this contender's steps, mean over the rounds
                    prev = res.info.get("cpu", {})
                    res.info["cpu"] = {k: (prev.get(k, 0.0) * r + v) / (r + 1) for k, v in m["cpu"].items()}
                if m.get("faults") is not None:  # page faults of its process but the pager thread, mean per step
                    prev = res.info.get("faults_per_step", [0.0, 0.0])
                    res.info["faults_per_step"] = [(p * r + v) / (r + 1) for p, v in zip(prev, m["faults"])]
                if m.get("vm") is not None:  # the kernel's memory work during its steps, mean per step
                    prev = res.info.get("vm_per_step", {})
                    res.info["vm_per_step"] = {k: (prev.get(k, 0.0) * r + v) / (r + 1) for k, v in m["vm"].items()}
                if "pager_late" in m:  # acquires whose layer the pager had not read ahead, per measured step
                    res.info["pager_late_per_step"] = (m["pager_late"] - warm[n].get("pager_late", 0)) / (r + 1)
                    res.info.update(page_cache_window=m["pager_capacity"], page_cache_trim=m["pager_trim"],
                                    page_cache_evicted_per_step=(m["pager_evicted"] - warm[n].get("pager_evicted", 0)) / (r + 1),
                                    page_cache_shed_per_step=(m["pager_shed"] - warm[n].get("pager_shed", 0)) / (r + 1),
                                    page_cache_min_free=m["pager_min_free"])
                    res.info["page_cache_passes"] = m["pager_history"]  # (window, evicted, shed, lowest free, trim)
            log(f"round {r + 1}/{steps}: " + ", ".join(f"{n} {results[n].times[-1]:.3f} s" for n in names))
            if between_rounds is not None:  # no contender runs now
                between_rounds()
        for n in names:  # one more step each, untimed: the peak of malloc's bytes in use (the CPU)
            if n not in transient and spec.device == "cpu":
                results[n].peak_allocated = workers[n].request(op="step", reset_peak=False, allocated=True,
                                                               refill=bool(transient)).get("peak_allocated")
        return results, workers
    except BaseException:
        for w in workers.values():
            w.close()
        raise


def profile_contenders(workers: dict[str, "Worker"], trace: str) -> dict[str, str]:
    """One profiled step per contender; the Chrome trace goes to TRACE (or TRACE-<name>.json)."""
    tables = {}
    root, ext = os.path.splitext(trace)
    for n, w in workers.items():
        path = trace if len(workers) == 1 else f"{root}-{n}{ext or '.json'}"
        tables[n] = w.request(op="profile", path=os.path.abspath(path))["table"]
    return tables


def memory_peaks(workers: dict[str, "Worker"]) -> dict[str, dict]:
    """CUDA: one more step per contender with the allocator's history recorded; what was live at its peak
    (measure.peak_allocations), beside torch's own max_memory_allocated for that step."""
    return {n: {k: v for k, v in w.request(op="memory_peak").items() if k != "ok"} for n, w in workers.items()}


# The probes' layer counts: the per-layer time is (t(4) - t(1)) / 3, a third of the noise of t(2) - t(1)
# (with 1 and 2 layers the 7B shape's per-layer time read 1.02-1.52 s and the rest -0.02-0.90 s between runs).
FLOOR_LAYERS = (1, 4)
PROBE_REPEATS = 3  # a probe's time in a round is its fastest of this many steps: noise only ever adds time,
                   # and the per-layer time is a difference of two probes, which doubles their noise


def floor_probes(kept_layers: int, num_layers: int) -> list[str]:
    """The probe contenders `floor_from_rounds` needs for a step where `kept_layers` layers keep their activations."""
    kinds = ([""] if kept_layers < num_layers else []) + (["-kept"] if kept_layers > 0 else [])
    return [f"floor-{n}{k}" for k in kinds for n in FLOOR_LAYERS]


def floor_from_rounds(model: str, results: dict[str, ContenderResult], kept_layers: int) -> dict:
    """The floor's compute time from the probes timed in the same rounds (each probe's fastest step): with
    n layers, t(n) = t_rest +
    n * t_layer, for recomputed layers (checkpointed probes) and kept layers (probes without checkpointing);
    the step's compute is t_rest + kept * t_layer_kept + (L - kept) * t_layer."""
    from transformers import AutoConfig

    L = AutoConfig.from_pretrained(model).num_hidden_layers
    a, b = FLOOR_LAYERS
    kinds = [kind for kind in ("", "-kept") if f"floor-{a}{kind}" in results]

    def fit(pick):
        """(recomputed, kept, t_rest, compute) from the probe times `pick` chooses of each probe's steps;
        recomputed and kept are (rest, t_layer, {layers: time})."""
        fits = {}
        for kind in kinds:
            ta, tb = pick(results[f"floor-{a}{kind}"].times), pick(results[f"floor-{b}{kind}"].times)
            t_layer = (tb - ta) / (b - a)
            fits[kind] = (ta - a * t_layer, t_layer, {a: ta, b: tb})
        recomputed = fits.get("", fits.get("-kept"))  # a missing kind (the plan guessed otherwise): the other's
        kept = fits.get("-kept", recomputed)
        t_rest = (recomputed[0] + kept[0]) / 2
        return recomputed, kept, t_rest, t_rest + kept_layers * kept[1] + (L - kept_layers) * recomputed[1]

    # the fastest over all rounds: noise (steal, other processes) only adds time, and the per-layer time, a
    # difference of two probes, would carry both probes' noise (medians varied +-40% between runs)
    recomputed, kept, t_rest, compute = fit(min)
    # and each round's probes alone: the floor of the hour each round ran in, for a ratio round by round (the
    # machine's drift between rounds then cancels, as the interleaving intends)
    rounds = min(len(results[f"floor-{n}{kind}"].times) for kind in kinds for n in FLOOR_LAYERS)
    by_round = [fit(lambda times, r=r: times[r])[3] for r in range(rounds)]
    return {"t_layer": recomputed[1], "t_layer_kept": kept[1], "t_rest": t_rest, "kept_layers": kept_layers,
            "compute_s": compute, "layers_timed": recomputed[2], "layers_timed_kept": kept[2], "interleaved": True,
            "probe_repeats": PROBE_REPEATS, "compute_by_round_s": by_round,
            "probe_faults_per_step": {n: r.info["faults_per_step"] for n, r in results.items()
                                      if n.startswith("floor-") and "faults_per_step" in r.info}}
