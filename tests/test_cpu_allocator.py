"""cpu_allocator: the caching allocator for large CPU tensors (LEMA's CPU runs), in fresh processes, as it
changes the whole process's allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys, torch
from lema import cpu_allocator as ca
from lema.measure import rss_anon
MiB = 2**20
assert ca.install(8 * MiB) and ca.installed()
a = torch.empty(2 * MiB, dtype=torch.uint8)
address = a.data_ptr()
del a
b = torch.empty(2 * MiB, dtype=torch.uint8)      # the same size: the freed block again
assert b.data_ptr() == address, "a freed block was not reused"
s = ca.stats()
assert (s.hits, s.misses, s.in_use_bytes) == (1, 1, 2 * MiB), s
c = torch.empty(2 * MiB + 1, dtype=torch.uint8)  # a size in other pages: a new block
assert c.data_ptr() != address and ca.stats().misses == 2
small = torch.ones(1000)                         # under min_bytes: the allocator that was there before
assert ca.stats().in_use_bytes == 2 * MiB + 2 * MiB + 4096
del b, c, small
assert ca.stats().in_use_bytes == 0 and ca.stats().cached_bytes == 4 * MiB + 4096

# arithmetic on reused blocks is right (the blocks hold stale bytes: nothing may assume zeros)
x = torch.arange(3 * MiB // 4, dtype=torch.float32)
for _ in range(5):
    y = x * 2 + 1
    assert y[-1].item() == 2 * (3 * MiB // 4 - 1) + 1
    z = torch.zeros(3 * MiB // 4)
    assert z.abs().sum().item() == 0
    del y, z

# oneDNN's bf16 matmul takes its scratchpad through raw_allocate and frees it through raw_deleter(): blocks of
# ours and (under min_bytes) of the allocator before
for n in (64, 1024):
    inp = torch.randn(n, n, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(2 * n, n, dtype=torch.bfloat16)
    torch.nn.functional.linear(inp, weight).float().sum().backward()
    assert torch.allclose(inp.grad.float(), weight.float().sum(0).expand(n, n), rtol=2e-2, atol=1e-1)
del inp, weight

# what it holds stays under the most ever in use plus the cap: freed blocks under that mark are kept ...
many = [torch.ones(i * MiB // 4) for i in range(5, 13)]   # 1.25 .. 3 MiB, sizes all different: 17 MiB
s = ca.stats()
mark, before = s.high_water_bytes, s.releases
assert mark >= s.in_use_bytes >= 17 * MiB
del many
s = ca.stats()
assert s.cached_bytes >= 17 * MiB and s.releases == before, s
# ... and a new size that would take it past the mark plus the cap sends the oldest back to the OS first
big = torch.empty(16 * MiB, dtype=torch.uint8)
s = ca.stats()
assert s.releases > before and s.in_use_bytes + s.cached_bytes <= s.high_water_bytes + 8 * MiB, s
assert s.high_water_bytes <= mark + 8 * MiB  # the peak grew by the cap at most, not by the 16 MiB
del big
rss = rss_anon()
ca.release(0)
s = ca.stats()
assert s.cached_bytes == 0 and s.mapped_bytes == s.in_use_bytes >= 3 * MiB  # x (and what oneDNN keeps)
assert rss - rss_anon() >= 4 * MiB, "released blocks stayed resident"
assert ca.install(MiB) and ca.stats().hits >= 1  # a second install changes the cap only
print("ok")
"""


def run(*args, env=None):
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_freed_blocks_are_reused_by_size_and_the_cache_keeps_at_most_its_cap():
    done = run(SCRIPT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


FALLBACK = r"""
import torch
from lema import cpu_allocator as ca
assert not ca.install(2**26) and not ca.installed() and ca.stats() is None
assert torch.ones(2**20).sum().item() == 2**20
print("ok")
"""


def test_without_a_compiler_the_run_keeps_glibcs_allocator_and_says_why(tmp_path):
    done = run(FALLBACK, env={"CXX": str(tmp_path / "no-such-c++"), "LEMA_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert "caching CPU allocator is not available" in done.stderr and "no-such-c++" in done.stderr


def test_turned_off_by_the_environment():
    done = run(FALLBACK, env={"LEMA_CPU_ALLOCATOR": "0"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


STEPS = r"""
import sys, torch
from lema import LemaConfig, LemaModel, cpu_allocator
torch.set_num_threads(1)
if sys.argv[2] == "cached":  # every tensor of 4 KiB or more through the cache
    assert cpu_allocator.install(256 * 2**10, min_bytes=4096)
model = LemaModel(LemaConfig(model_name_or_path=sys.argv[1], lora_rank=4, lora_alpha=8, keep_activations=1))
model.initialize_lora(0)
torch.manual_seed(0)
for p in model.get_trainable_parameters():  # B != 0: the adapters change the output
    torch.nn.init.normal_(p, std=0.02)
opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
trainer = model.get_trainer(opt)
ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
losses = [trainer.train_step(ids, labels=ids)[1].item() for _ in range(3)]
if sys.argv[2] == "cached":
    s = cpu_allocator.stats()
    assert s.hits > 100 and s.hits > 10 * s.misses, s  # the steps ran on reused blocks
    assert s.in_use_bytes + s.cached_bytes <= s.high_water_bytes + s.cap_bytes, s
torch.save({"losses": losses, "lora": {n: p.detach().clone() for n, p in model.peft_model.named_parameters()
                                        if ".lora_" in n}}, sys.argv[3])
"""


def test_training_on_reused_blocks_gives_the_same_numbers(tiny_dir, tmp_path):
    """Three AdamW steps with every tensor of 4 KiB or more on the cache's reused (stale, never zeroed) blocks
    give bit for bit the losses and adapters of glibc's allocator."""
    import torch

    path = tiny_dir("llama")
    outs = {}
    for mode in ("glibc", "cached"):
        outs[mode] = str(tmp_path / f"{mode}.pt")
        done = run(STEPS, path, mode, outs[mode])
        assert done.returncode == 0, done.stderr[-3000:]
    glibc, cached = (torch.load(outs[m]) for m in ("glibc", "cached"))
    assert glibc["losses"] == cached["losses"] and glibc["losses"][0] > glibc["losses"][-1]
    assert glibc["lora"].keys() == cached["lora"].keys() and glibc["lora"]
    for n, t in glibc["lora"].items():
        assert torch.equal(t, cached["lora"][n]), n


@pytest.mark.parametrize("budget", [None, "20GB"])
def test_a_cpu_run_installs_it_with_the_plans_cap(tiny_dir, make_lema, budget):
    """LemaModel on the CPU, with a budget or without: the allocator is PyTorch's, and a training step sets its
    cap to the plan's allocator cache (one layer's work at that step's size). In this process: any later test
    runs with it too, as a LEMA run's process does."""
    import torch

    from lema import cpu_allocator
    from lema.planner import plan_for_config

    model = make_lema(tiny_dir("llama"), max_vram=budget)
    if not model.host_allocator_cached:
        pytest.skip("the allocator could not be built here (no C++ compiler)")
    assert cpu_allocator.installed()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1 if budget else 2))
    model(ids, labels=ids).loss.backward()
    p = plan_for_config(model.config, batch_size=2, seq_len=12)
    assert cpu_allocator.stats().cap_bytes == p.allocator_cache_bytes == p.layer_work_bytes > 0
