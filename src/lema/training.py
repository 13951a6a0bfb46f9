"""The fine-tuning recipe behind `lema train`: setup, train, save_checkpoint — one explicit loop.

setup: data (validated before anything is written) -> LemaModel -> AdamW + warmup/decay schedule
       -> resume state (newest complete checkpoint) -> the plan, printed
train: micro-batches through LemaTrainer.train_step; every optimizer step a log line
       (OUT/log.jsonl) and the progress bar; every `save_steps` a checkpoint; eval every
       `eval_steps`; Ctrl-C finishes the step in flight, saves a checkpoint and exits; a step whose loss or
       gradient norm is not finite is not applied and stops the run, saving nothing (an error names the step)
save:  OUT/adapter (PEFT format) at the end
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpointing import (CheckpointError, changed_settings, data_identity, list_checkpoints, load_checkpoint,
                            newest_readable, prune_checkpoints, save_checkpoint, set_aside)
from .config import check_seed
from .engine.skeleton import load_hf_config, model_positions
from .fsutil import check_writable, existing_ancestor
from .plan_table import human
from .planner import free_memory_bytes, plan_for_config
from .run_folder import lock_output, truncate_log, unlock_output
from .store import weights_fingerprint
from .trainer import CollapsedStepError, DivergedStepError


@dataclass
class TrainArgs:
    """Settings of one `lema train` run."""

    model: str = ""
    """Model folder (a Transformers checkpoint, e.g. from `lema convert`)."""
    data: str = ""
    """Training data, JSONL: {"text"}, {"prompt","completion"} or {"messages"} per line."""
    output: str = ""
    """Output folder: checkpoints, log.jsonl and the final adapter/."""
    steps: Optional[int] = None
    """Optimizer steps to run (default: one epoch)."""
    epochs: Optional[float] = None
    """Epochs to run instead of --steps (rounded up to whole optimizer steps of --grad-accum micro-batches)."""
    batch_size: int = 4
    """Examples per micro-batch."""
    seq_len: int = 512
    """Longest example in tokens; longer ones are truncated (and counted)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the LoRA weights (0, as Transformers' Trainer)."""
    warmup_steps: int = 0
    """Steps of linear warmup to --lr (step s of w runs at (s + 1) / w of it)."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the LoRA gradients' global norm to this (0: no clipping)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA alpha (scale alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; default every linear layer inside the decoder layers."""
    save_steps: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    save_total_limit: Optional[int] = 3
    """Keep only the newest this many checkpoints (0: keep them all); one more until a step from the newest's
    weights has been applied (so a run that collapses there has the one before): a finished or stopped run keeps
    N + 1, a resumed run prunes after its first step."""
    eval_data: Optional[str] = None
    """Evaluation data (JSONL, same formats); its mean loss goes to the log."""
    eval_steps: Optional[int] = None
    """Evaluate every this many steps (default: at --save-steps)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in --output."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    strategy: str = "streaming"
    """streaming or resident."""
    dtype: str = "float32"
    """Compute dtype of the frozen weights: float32, bfloat16, float16."""
    num_buffers: int = 3
    """Ring depth for streaming (no more slots than layers to stream, 2 at least)."""
    max_vram: Optional[str] = None
    """Device memory budget, e.g. 16GB; the run is refused before it starts if the plan does not fit."""
    keep_activations: Optional[int] = None
    """Decoder layers that keep their activations instead of recomputing them in backward (default: as many as
    --max-vram, or what the run leaves of the free memory (at most half), allows; 0: recompute all, least memory)."""
    page_cache: Optional[str] = None
    """Page cache the streamed layers may hold, read ahead by a thread, e.g. 16GB (default: automatic when
    the weights exceed the available memory; off: leave it to the kernel)."""
    resident_layers: Optional[int] = None
    """Streaming: decoder layers that stay loaded for the run, spread through the stack (default: on a GPU the
    plan shares the memory --max-vram, or what the run leaves of the free memory (at most half), leaves between
    resident layers and kept activations by the step time each saves; on the CPU 0; the plan printed at the
    start says which)."""
    offload_activations: Optional[bool] = None
    """GPU: the recomputed layers' inputs in pinned host memory between forward and backward (auto: only when
    --max-vram is not met otherwise)."""
    zero_copy: Optional[bool] = None
    """Streaming: the layers served as the file holds them: on the CPU views of the mmap, on a GPU each layer
    copied straight from its file pages, registered with CUDA and locked in RAM. auto (and on, on the CPU):
    where the file holds every layer tensor in the compute dtype as one tensor (not per-expert ones stacked on
    load), and on a GPU the layers fit in RAM and no --page-cache size is given; on (GPU): refused where it
    cannot apply; off: read into slots (on a GPU, staged through pinned host memory)."""
    seed: int = 0
    """Seed of LoRA init, data order and dropout."""
    quiet: bool = False
    """No progress bar or progress lines (the steps still go to log.jsonl)."""

    def __post_init__(self):
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        for f in dataclasses.fields(self):  # nan passes every comparison below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')}={value} must be a finite number")
        for name in ("batch_size", "grad_accum", "save_steps", "steps", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2:  # one token predicts nothing: the first token is no position's target
            raise ValueError(f"--seq-len={self.seq_len} must be >= 2")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs={self.epochs} must be > 0")
        for name in ("warmup_steps", "save_total_limit", "max_grad_norm", "weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha={self.lora_alpha} must be > 0 (the adapter's scale is alpha / r)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout={self.lora_dropout} must be >= 0 and < 1 (a probability)")
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise ValueError(f"--output {self.output!r} is a file; give a folder (new or of an earlier run)")
        above = existing_ancestor(self.output)  # the output itself where it exists: the run makes the rest
        if not os.path.isdir(above):
            raise ValueError(f"--output {self.output!r} lies under {above!r}, which is a file; give a folder")
        check_writable(above, f"--output {self.output!r}")
        check_seed(self.seed)
        if os.path.isdir(self.model) and os.path.realpath(self.output) == os.path.realpath(self.model):
            raise ValueError(f"--output {self.output!r} is the model folder; checkpoints and the adapter go in a "
                             "folder of their own: choose another --output")
        if self.eval_steps is not None and not self.eval_data:
            raise ValueError(f"--eval-steps={self.eval_steps} needs --eval-data (the examples to evaluate on)")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule={self.schedule!r}: use cosine, linear or constant")
        if self.lr <= 0:
            raise ValueError(f"--lr={self.lr} must be > 0")
        if self.lr / (1 - 0.9) > torch.finfo(torch.float32).max:  # AdamW's first step: lr / (1 - beta1)
            raise ValueError(f"--lr={self.lr:g} is past what AdamW can step in float32 (its first step scales by "
                             f"lr / (1 - 0.9) = {self.lr / 0.1:.3g}, above {torch.finfo(torch.float32).max:.3g}); "
                             "LoRA trains at about 1e-4")
        if not self.max_grad_norm:
            self.max_grad_norm = None
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def _check_tokens(args, hf_config, tokenizer, datasets) -> int:
    """Refuse, before the model loads, data the model cannot take (longer than its positions, ids outside its
    vocabulary); returns the pad id (the tokenizer's, or EOS / 0 when it has none inside the vocabulary)."""
    vocab = getattr(hf_config, "vocab_size", None)
    limit = model_positions(hf_config)
    for path, ds in datasets:
        if ds is None:
            continue
        longest = max(len(it["input_ids"]) for it in ds.items)
        if limit and longest > limit:
            raise ValueError(f"{path}: examples of up to {longest} tokens pass --seq-len={args.seq_len}, but the model "
                             f"has {limit} positions; use --seq-len {limit}")
        top = max(max(it["input_ids"]) for it in ds.items)
        if vocab and top >= vocab:
            raise ValueError(f"{path}: the tokenizer gives token id {top}, outside the model's vocabulary of {vocab} "
                             f"(ids 0..{vocab - 1}); the tokenizer in {args.model!r} does not belong to its weights")
    candidates = [tokenizer.pad_token_id, tokenizer.eos_token_id, 0]  # padding is masked: any valid id will do
    return next(i for i in candidates if i is not None and (not vocab or i < vocab))


def epoch_steps(args: TrainArgs, sampler) -> int:
    """Optimizer steps of --epochs (default one), rounded up to whole steps of --grad-accum micro-batches: the last
    step may take up to grad_accum - 1 micro-batches of the next epoch's order. Refused where one step alone is
    more than the epochs asked for: rounding up would train several times the data (--grad-accum 100 on an
    epoch of 6 micro-batches: 17 epochs for --epochs 1)."""
    epochs = args.epochs or 1
    wanted = len(sampler) * epochs  # micro-batches, an epoch's last one partial (BatchSampler)
    if args.grad_accum > math.ceil(wanted):
        asked = f"--epochs {args.epochs:g}" if args.epochs else "one epoch (the default without --steps)"
        fixes = [f"--grad-accum {math.ceil(wanted)} or less"]
        if math.ceil(sampler.num_examples * epochs) >= args.grad_accum:  # batches of 1 would be enough
            fixes.append("a smaller --batch-size")
        raise ValueError(f"{asked} is {wanted:g} micro-batches ({sampler.num_examples} examples in batches of "
                         f"--batch-size {args.batch_size}), fewer than one optimizer step of --grad-accum "
                         f"{args.grad_accum}, which would train {args.grad_accum / len(sampler):.3g} epochs; use "
                         f"{', '.join(fixes)}, or --steps to train that many steps of {args.grad_accum} micro-batches")
    return math.ceil(wanted / args.grad_accum)


def resume_schedule(optimizer, scheduler, lr: float, schedule) -> None:
    """After a checkpoint's optimizer and scheduler are loaded: the rates of *this* run's schedule at the
    checkpoint's step (the same values when nothing changed; with a new --steps or --lr the checkpoint's rate
    is the old schedule's, which the next step would use)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def _rss_bytes() -> int:
    from .host_memory import proc_bytes

    return proc_bytes("/proc/self/status", "RssAnon")


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: the run stops at once; the command exits 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


class _Interrupt:
    """Ctrl-C (or SIGTERM) sets a flag; the loop finishes the step, saves a checkpoint and stops. A second one
    stops at once, saying which checkpoint the run goes on from."""

    def __init__(self, output: str):
        self.output = output
        self.requested = False
        self.signum = None  # the first signal's number (the command's exit status is 128 + it)
        self._old = self._old_term = None

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        self._old_term = signal.signal(signal.SIGTERM, self._handle)  # a scheduler's preemption, `docker stop`
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            try:
                kept = list_checkpoints(self.output, complete=True)
            except OSError:
                kept = []
            print("\nlema train: stopping now, without saving the step in flight; "
                  + (f"--resume goes on from {kept[-1][1]} (step {kept[-1][0]})" if kept else
                     "no checkpoint was saved yet"), file=sys.stderr)
            raise StopNow(signum)
        self.requested = True
        self.signum = signum
        what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nlema train: {what} received, saving a checkpoint after this step "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        signal.signal(signal.SIGTERM, self._old_term)


def redraws(out) -> bool:
    """Whether `out` shows a progress bar redrawn in place (tqdm's `\\r`): a terminal, or a Jupyter notebook's
    output stream, which renders the redraws too; elsewhere (a file, a pipe) progress prints as lines."""
    return getattr(out, "isatty", lambda: False)() or type(out).__module__.startswith("ipykernel")


def rate(x: float) -> str:
    """A rate as progress shows it: whole numbers from 100 up, three significant digits below (a 7B step on a CPU
    runs ~4 tokens/s, which rounding to a whole number showed as 4 or 0)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


class _LineProgress:
    """Progress where the output is not a terminal (a log file, a pipe): one line at the first step, then at most
    every `every` seconds and at each checkpoint and the last step. tqdm's carriage-return redraws would pile up
    there as one endless line."""

    def __init__(self, out, total: int, every: float = 30.0):
        self.out, self.total, self.every = out, total, every
        self.t0 = self.last = time.perf_counter()
        self.first = True

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, memory: int, force: bool) -> None:
        now = time.perf_counter()
        if not (force or self.first or now - self.last >= self.every):
            return
        self.first, self.last = False, now
        print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  tok/s {rate(tokens_per_s)}  "
              f"mem {human(memory)}  elapsed {now - self.t0:.0f} s", file=self.out, flush=True)


def _set_aside_collapsed(output: str, step: int, error: DivergedStepError) -> Optional[tuple[str, str]]:
    """A collapsed step (flat outputs) says the weights it ran with are dead: a checkpoint of them, saved after the
    step before, is set aside as `collapsed-checkpoint-STEP`, so that --resume takes the one before it. Returns
    (its path, where it went), or None."""
    kept = list_checkpoints(output, complete=True)
    if isinstance(error, CollapsedStepError) and kept and kept[-1][0] == step - 1:
        return kept[-1][1], set_aside(kept[-1][1], "collapsed")
    return None


def _diverged(args: TrainArgs, step: int, error: DivergedStepError, lr: float,
              moved: Optional[tuple[str, str]] = None) -> str:
    """The error of a run stopped at a diverged step: which step and value, the checkpoint to go on from (`moved`:
    the collapsed one set aside). Every checkpoint saved came after steps of finite loss and gradients, so its
    weights are finite: AdamW moves a weight by about the learning rate a step: only a rate near float32's limit
    (where torch's AdamW fails) overflows one."""
    kept = list_checkpoints(args.output, complete=True)
    collapsed = isinstance(error, CollapsedStepError)
    moved = f"{moved[0]} holds those weights: moved to {moved[1]}; " if moved else ""
    where = moved + (f"the checkpoints are kept, the newest {kept[-1][1]} (step {kept[-1][0]})" if kept else
                     ("no older checkpoint is kept" if moved else "no checkpoint was saved before it"))
    fixes = f"lower --lr (now {args.lr:g})"
    if not collapsed:  # a collapse comes from the steps' size; a non-finite value may come from the inputs too
        fixes += (", set --max-grad-norm (e.g. 1.0; clipping is off)" if args.max_grad_norm is None else "") + \
            " or check the data and the model's weights"
    fresh = ("run again with another --output (or move its adapter/ away first)"
             if os.path.isdir(os.path.join(args.output, "adapter")) else "run again")
    then = ("run again with --resume (changed settings apply from its step on; if the same step fails again, the "
            "checkpoint's weights have diverged already: move it away to resume from an older one)" if kept else
            fresh)
    return f"step {step} (lr {lr:.3g}): {error}; stopped without saving it: {where}; {fixes}, then {then}"


def evaluate(model, dataset, batch_size: int, pad_id: int) -> float:
    from .batching import collate

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))], pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:  # nothing to predict: its mean loss is NaN
                continue
            out = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
            total += float(out.loss) * n  # host sync, once per eval batch
            count += n
    return total / max(count, 1)


def _check_fits_free_memory(plan, free: int, config) -> None:
    """Without --max-vram nothing bounds the run but the memory there is: a plan whose peak passes the memory free
    (`free`, measured once for the plan and this check) is refused before anything is allocated (it started, then
    died of the allocator's out-of-memory error with a traceback, or of the kernel's OOM killer). Kept layers,
    decided again at run time from the memory free then, do not count."""
    from .planner import PlanError

    if plan.peak_bytes - plan.kept_layers * plan.kept_extra_bytes <= free:
        return
    device = "host" if config.torch_device.type == "cpu" else str(config.torch_device)
    adapters = plan.lora_bytes + plan.grad_bytes + plan.optimizer_bytes
    raise PlanError(f"the run needs {human(plan.peak_bytes)} of {device} memory at its peak ({plan.peak_phase}) but "
                    f"{human(free)} is free now; LoRA adapters, gradients and optimizer state take {human(adapters)} "
                    f"(--lora-rank {config.lora_rank}), the activations grow with --batch-size and --seq-len: lower "
                    "them (`lema plan` shows each part), or free memory")


def train(args: TrainArgs, out=None) -> dict:
    """Run the recipe; returns a summary (steps, final loss, paths). `out`: where it prints (default: sys.stdout
    when called, so a redirection made after import applies). However it ends, the output folder's lock goes
    with it (a notebook's failed run would otherwise hold it against the next one, in any process)."""
    held = []  # set by _train once it holds the lock: only a lock this run took is let go
    try:
        return _train(args, sys.stdout if out is None else out, held)
    except BaseException:
        if held:
            unlock_output(args.output)
        raise


def _train(args: TrainArgs, out, held: list) -> dict:
    from . import LemaConfig, LemaModel
    from .batching import BatchSampler, collate
    from .data import TokenizedDataset, dropped_causes, load_jsonl, load_tokenizer

    # ---- setup: validate every input before anything is written --------------------------
    examples = load_jsonl(args.data)
    eval_examples = load_jsonl(args.eval_data) if args.eval_data else None
    checkpoints = list_checkpoints(args.output)
    if args.resume and not checkpoints:
        raise CheckpointError(f"--resume: no complete checkpoint in {args.output!r}; run without --resume to "
                              "start a new run")
    if not args.resume and checkpoints:
        raise CheckpointError(f"{args.output!r} already holds checkpoints (newest: {checkpoints[-1][1]}); add "
                              "--resume to continue that run, or choose a new --output")
    if not args.resume and os.path.isdir(os.path.join(args.output, "adapter")):  # a new run would replace it
        raise CheckpointError(f"{args.output!r} holds the adapter of an earlier run (adapter/) and no checkpoint "
                              "to resume; choose a new --output, or move that adapter away first")
    locked = os.path.isdir(args.output)
    if locked:  # another run writing there is named now, not after the model has loaded and the plan printed
        lock_output(args.output)
        held.append(True)
    hf_config = load_hf_config(args.model)  # a missing folder or an unknown architecture is named first
    tokenizer = load_tokenizer(args.model)
    dataset = TokenizedDataset(examples, tokenizer, args.seq_len)
    eval_set = TokenizedDataset(eval_examples, tokenizer, args.seq_len) if eval_examples else None
    pad_id = _check_tokens(args, hf_config, tokenizer, [(args.data, dataset), (args.eval_data, eval_set)])
    sampler = BatchSampler(len(dataset), args.batch_size, seed=args.seed)
    total_steps = args.steps or epoch_steps(args, sampler)

    torch.manual_seed(args.seed)
    config = LemaConfig(model_name_or_path=args.model, strategy=args.strategy, device=args.device,
                        dtype=args.dtype, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, lora_target_modules=args.target_modules,
                        num_buffers=args.num_buffers, max_vram=args.max_vram,
                        keep_activations=args.keep_activations, page_cache=args.page_cache,
                        resident_layers=args.resident_layers or 0, offload_activations=args.offload_activations,
                        zero_copy=args.zero_copy)
    # raises before allocating if a budget cannot fit; decides the resident layers when not given
    # without a budget, the free memory measured once: the plan's room for kept layers and the check use it alike
    free_now = free_memory_bytes(config.torch_device) if config.max_vram_bytes is None else None
    # rows of different lengths in a batch of several are right-padded: attention then takes a mask (planner.plan)
    padded = args.batch_size > 1 and len({len(it["input_ids"]) for it in dataset.items}) > 1
    plan = plan_for_config(config, batch_size=args.batch_size, seq_len=args.seq_len,
                           auto_resident=args.resident_layers is None, free_now=free_now, padded=padded)
    if free_now is not None:
        _check_fits_free_memory(plan, free_now, config)
    config = dataclasses.replace(config, resident_layers=plan.resident_layers)
    model = LemaModel(config)
    model.initialize_lora(seed=args.seed)
    params = model.get_trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule))
    identity = {"model": os.path.abspath(args.model), "model_weights": weights_fingerprint(model.store),
                "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_target_modules": model.lora_targets,
                "data": data_identity(args.data), "seq_len": args.seq_len, "grad_accum": args.grad_accum,
                "settings": {"lr": args.lr, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
                             "lora_dropout": args.lora_dropout, "dtype": args.dtype, "schedule": args.schedule,
                             "warmup_steps": args.warmup_steps, "total_steps": total_steps}}
    step, damaged, changed = 0, [], []
    if args.resume:  # the newest checkpoint that can be read; damaged newer ones are set aside below
        resumed, state, damaged = newest_readable(
            checkpoints, lambda path: load_checkpoint(path, model, optimizer, scheduler, identity))
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:  # another --batch-size or --seed (the data's own change is named above)
            saved = state["sampler"]
            flags = [f"{flag} {saved[k]}" for k, flag in (("batch_size", "--batch-size"), ("seed", "--seed"))
                     if k in saved and saved[k] != getattr(sampler, k)]
            raise CheckpointError(f"checkpoint {resumed!r}: {e}; resume with the run's settings"
                                  f"{' (' + ', '.join(flags) + ')' if flags else ''} or use a new --output") from None
        step = state["step"]
        resume_schedule(optimizer, scheduler, args.lr, lambda s: lr_lambda(s, args.warmup_steps, total_steps,
                                                                           args.schedule))
        for group in optimizer.param_groups:  # the loaded state carries the checkpoint's; this run's applies
            group["weight_decay"] = args.weight_decay
        changed = changed_settings(state.get("run", {}), identity)
    trainer = model.get_trainer(optimizer, gradient_accumulation_steps=args.grad_accum,
                                max_grad_norm=args.max_grad_norm)

    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.base_model.parameters()) - n_train  # meta params count too
    print(f"LEMA train  model {args.model}  ({type(model.base_model).__name__}, {model.units.num_layers} layers)\n"
          f"  parameters: {n_frozen:,} frozen, {n_train:,} trainable (LoRA r={args.lora_rank}, "
          f"targets {', '.join(model.lora_targets)})\n"
          f"  data: {len(dataset)} examples, {dataset.num_tokens:,} tokens, {dataset.num_truncated} truncated to "
          f"{args.seq_len}, {dataset.num_dropped} dropped (nothing to learn"
          + (f": {dropped_causes(dataset.dropped, args.seq_len)}" if dataset.num_dropped else "") + ")\n"
          f"  steps: {step} -> {total_steps}, batch {args.batch_size} x {args.grad_accum} accumulation, lr {args.lr} "
          f"({args.schedule}, warmup {args.warmup_steps})\n{plan.table()}", file=out, flush=True)

    # ---- train -------------------------------------------------------------------------------
    os.makedirs(args.output, exist_ok=True)
    if not locked:
        lock_output(args.output)  # one run writes to a folder at a time
        held.append(True)
    if list_checkpoints(args.output) != checkpoints:
        raise CheckpointError(f"the checkpoints in {args.output!r} changed while this run was starting (another "
                              "run writing there?); start it again")
    for path, why in damaged:
        print(f"warning: {path} cannot be read ({why}); moved to {set_aside(path)}, resuming from {resumed} "
              f"(step {step})", file=out, flush=True)
    if args.warmup_steps > total_steps:  # the last step runs at total / warmup of the rate
        top = total_steps / args.warmup_steps
        print(f"note: --warmup-steps {args.warmup_steps} is longer than the run's {total_steps} steps: the rate "
              f"rises to {args.lr * top:.3g} at most, never to --lr {args.lr:g}", file=out, flush=True)
    if changed:
        print(f"note: resuming {resumed} with settings changed from its run's: {', '.join(changed)} (they apply "
              "from this step on)", file=out, flush=True)
    # steps after the checkpoint run again; a new run's log starts empty (a run killed before its first
    # checkpoint leaves records that no checkpoint holds)
    truncate_log(os.path.join(args.output, "log.jsonl"), step)
    log = open(os.path.join(args.output, "log.jsonl"), "a")
    bar = lines = None
    if not args.quiet and redraws(out):
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=out, dynamic_ncols=True)
    elif not args.quiet:
        lines = _LineProgress(out, total_steps)
    eval_every = args.eval_steps or args.save_steps
    # pruning waits for a step from the newest checkpoint's weights: a resumed run's first step is one
    last_loss, interrupted, diverged, prune_due = None, False, None, bool(args.resume)
    tokens_total, t_start = 0, time.perf_counter()
    with _Interrupt(args.output) as interrupt:
        while step < total_steps:
            t0, step_loss, step_tokens = time.perf_counter(), 0.0, 0
            micro = [collate([dataset[i] for i in sampler.next_batch()], pad_id) for _ in range(args.grad_accum)]
            targets = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]  # each >= 1 (TokenizedDataset)
            total = sum(targets)
            try:
                for batch, n in zip(micro, targets):  # the step's loss: the mean over all its targets (as Trainer)
                    _, loss = trainer.train_step(batch["input_ids"], labels=batch["labels"],
                                                 attention_mask=batch["attention_mask"], num_items_in_batch=total)
                    step_loss += float(loss) * n / total  # host sync, once per micro-batch
                    step_tokens += int(batch["attention_mask"].sum())
            except DivergedStepError as e:  # the trainer did not apply it; nothing is saved from here on.
                # No log line: log.jsonl holds the steps applied, each a valid JSON line (NaN is not JSON); the
                # error names the values instead.
                moved = _set_aside_collapsed(args.output, step + 1, e)
                diverged = _diverged(args, step + 1, e, optimizer.param_groups[0]["lr"], moved)
                break
            lr_used = optimizer.param_groups[0]["lr"]  # the rate this step ran at (scheduler.step sets the next)
            scheduler.step()
            step += 1
            if prune_due:  # the weights of the newest checkpoint ran a step that was applied: the older ones may go
                prune_checkpoints(args.output, args.save_total_limit)
                prune_due = False
            dt = time.perf_counter() - t0
            tokens_total += step_tokens
            last_loss = step_loss
            mem = model.memory_stats(optimizer)
            used = mem.get("device_allocated", _rss_bytes())
            record = {"step": step, "loss": round(step_loss, 6), "lr": lr_used,
                      "tokens_per_s": float(rate(step_tokens / dt)), "step_s": round(dt, 3),
                      "grad_norm": trainer.last_grad_norm, "memory_bytes": used}
            if eval_set is not None and (step % eval_every == 0 or step == total_steps):
                record["eval_loss"] = round(evaluate(model, eval_set, args.batch_size, pad_id), 6)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=rate(record["tokens_per_s"]), mem=human(used))
                bar.update(1)
            save = step % args.save_steps == 0 or step == total_steps or interrupt.requested
            if lines is not None:
                lines.step(step, step_loss, record["lr"], record["tokens_per_s"], used, force=save)
            if save:
                os.fsync(log.fileno())  # the log holds every step the checkpoint does, power cut or not
                save_checkpoint(args.output, step, model, optimizer, scheduler, sampler.state_dict(), identity)
                prune_due = True
            if interrupt.requested and step < total_steps:  # in the last step: the run is done, adapter and all
                interrupted = True
                break
    if bar is not None:
        bar.close()
    log.close()
    if diverged is not None:  # the checkpoints saved before it are kept as they are; no final adapter
        model.close()
        unlock_output(args.output)
        raise ValueError(diverged)
    # no pruning at the end: no step has run from the last checkpoint's weights (a step collapsing them shows only in
    # the next one), so the one before stays until a resumed run applies a step (prune_due)
    adapter_dir = os.path.join(args.output, "adapter")
    if not interrupted:
        model.save_adapter(adapter_dir)
    model.close()
    unlock_output(args.output)
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "loss": last_loss, "interrupted": interrupted, "signal": interrupt.signum,
               "adapter": adapter_dir,
               "tokens_per_s": tokens_total / elapsed if elapsed else 0.0}
    if interrupted:
        print(f"stopped at step {step}; checkpoint {os.path.join(args.output, f'checkpoint-{step}')} saved. Continue "
              "with the same command plus --resume.", file=out)
    elif last_loss is None:  # resumed at or past the last step: only the final adapter was (re)written
        print(f"nothing to train: {args.output!r} is at step {step} of {total_steps}; adapter in {adapter_dir} "
              "(raise --steps to train further)", file=out)
    else:
        print(f"done: {step} steps, last loss {last_loss:.4f}, adapter in {adapter_dir}", file=out)
    return summary


