"""Bad inputs fail early, as ValueError / FileNotFoundError (or their subclasses), with a message
that names the bad value and says what to do. No deep traceback from inside Transformers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.engine.skeleton import ArchitectureError
from lema.store import WeightsFileError

VOCAB, POSITIONS = 96, 64


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def build(path: str, **config) -> LemaModel:
    config.setdefault("lora_rank", 4)
    model = LemaModel(LemaConfig(model_name_or_path=path, **config))
    model.close()
    return model


def raises(exc_type, *fragments):
    """pytest.raises that also checks the message holds every fragment (plain substrings)."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in the message: {message}"
            return handled

    return Check()


# ------------------------------------------------------------------------------ the checkpoint
def test_missing_folder(tmp_path):
    path = str(tmp_path / "no-such-model")
    with raises(FileNotFoundError, path, "does not exist"):
        build(path)


def test_empty_model_name():
    with raises(ValueError, "model_name_or_path is empty"):
        LemaConfig(model_name_or_path="")


def test_missing_config_json(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    os.remove(os.path.join(path, "config.json"))
    with raises(FileNotFoundError, "no config.json", path):
        build(path)


def test_missing_weights_file(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with raises(WeightsFileError, "no weights in", path, "model.safetensors"):
        build(path)


def test_missing_gbi_path(tiny_dir, tmp_path):
    missing = str(tmp_path / "packed.safetensors")
    with raises(WeightsFileError, f"gbi_path={missing!r}", "lema convert"):
        build(tiny_dir("llama"), gbi_path=missing)


@pytest.mark.parametrize("keep", [0.5, 0.999, 5 / (2**20)], ids=["half", "last-bytes", "header"])
def test_truncated_safetensors(keep, tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(max(1, int(size * keep)) if keep > 0.001 else 5)
    with raises(WeightsFileError, weights) as info:
        build(path)
    assert "truncated" in str(info.value) or "too short" in str(info.value)


def test_corrupt_header(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    with raises(WeightsFileError, weights, "not valid JSON"):
        build(path)


@pytest.mark.parametrize("strategy", ["streaming", "resident"])
@pytest.mark.parametrize("arch", ["llama", "mixtral"])  # mixtral: experts fused by a converter, no file tensor
def test_weights_of_another_shape(arch, strategy, tiny_dir, tmp_path):
    path = copy_model(tiny_dir(arch), tmp_path / "m")
    edit_config(path, intermediate_size=80)  # the file's MLP weights are 64 wide
    # mixtral's gate_up_proj fuses w1 and w3 of each expert: (experts, 2 * 64, 32) against (4, 160, 32)
    have, want = (("(4, 128, 32)", "(4, 160, 32)") if arch == "mixtral" else ("64", "80"))
    with raises(WeightsFileError, "model.layers.0.mlp", have, want, "config.json implies"):
        build(path, strategy=strategy)


def test_weights_missing_a_layer(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    edit_config(path, num_hidden_layers=4)  # the file has 3
    with raises(WeightsFileError, "lack", "model.layers.3."):
        build(path)


def test_unknown_architecture(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    edit_config(path, model_type="nonexistent")
    with raises(ArchitectureError, "model_type='nonexistent'", "upgrade transformers"):
        build(path)


def test_architecture_without_causal_lm_class(tmp_path):
    from transformers import ViTConfig

    path = str(tmp_path / "vit")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    with raises(ArchitectureError, "no causal-LM class", "vit"):
        build(path)


def test_invalid_config_json(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{ not json")
    with raises(ValueError, "config.json", "not valid JSON"):
        build(path)


# ------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_lora_rank_must_be_positive(rank, tiny_dir):
    with raises(ValueError, f"lora_rank={rank!r}", "positive integer"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), lora_rank=rank)


def test_lora_targets_that_match_nothing(tiny_dir):
    with raises(ValueError, "['nope_proj']", "match no module", "q_proj"):
        build(tiny_dir("llama"), lora_target_modules=["q_proj", "nope_proj"])


def test_lora_targets_that_are_not_linear_layers_and_a_rank_past_every_width(tiny_dir):
    """PEFT's own error printed the whole attention module; a rank of 100000 on a 576-wide model built its adapters."""
    with raises(ValueError, "not linear layers: mlp (LlamaMLP)", "q_proj"):
        build(tiny_dir("llama"), lora_target_modules=["q_proj", "mlp"])
    with raises(ValueError, "lora_rank=100000 exceeds", "use --lora-rank 32 or less"):
        build(tiny_dir("llama"), lora_rank=100000)
    build(tiny_dir("llama"), lora_rank=32)  # the widest layer's smaller side: kept


def test_lora_targets_outside_decoder_layers(tiny_dir):
    with raises(ValueError, "['lm_head']", "outside the decoder layers"):
        build(tiny_dir("llama"), lora_target_modules=["lm_head"])


@pytest.mark.parametrize("n", [1, 0])
def test_num_buffers_at_least_two(n, tiny_dir):
    with raises(ValueError, f"num_buffers={n}", ">= 2"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), num_buffers=n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_without_cuda(tiny_dir):
    with raises(ValueError, "device='cuda'", "CUDA is not available", "device='cpu'"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), device="cuda")


@pytest.mark.parametrize("device", ["tpu", "gpu0", "mps"])
def test_unknown_device(device, tiny_dir):
    with raises(ValueError, f"device={device!r}"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), device=device)


@pytest.mark.parametrize("dtype", ["float8", "int8", "fp64"])
def test_unknown_dtype(dtype, tiny_dir):
    with raises(ValueError, f"dtype={dtype!r}", "float32, bfloat16, float16"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), dtype=dtype)


def test_unknown_strategy(tiny_dir):
    with raises(ValueError, "strategy='offload'", "streaming"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), strategy="offload")


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_lora_dropout_range(p, tiny_dir):
    with raises(ValueError, f"lora_dropout={p!r}"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), lora_dropout=p)


def test_bad_max_vram(tiny_dir):
    with raises(ValueError, "max_vram='lots'", "16GB"):
        LemaConfig(model_name_or_path=tiny_dir("llama"), max_vram="lots")


def test_trainer_settings(tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama"))
    opt = torch.optim.SGD(model.get_trainable_parameters(), lr=0.1)
    with raises(ValueError, "gradient_accumulation_steps=0"):
        model.get_trainer(opt, gradient_accumulation_steps=0)
    with raises(ValueError, "max_grad_norm=0"):
        model.get_trainer(opt, max_grad_norm=0)


# --------------------------------------------------------------------------------------- inputs
@pytest.fixture
def llama(tiny_dir, make_lema):
    return make_lema(tiny_dir("llama"), strategy=MemoryStrategy.STREAMING)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_token_id_outside_vocab(bad, llama):
    ids = torch.randint(0, VOCAB, (2, 8))
    ids[1, 3] = bad
    with raises(ValueError, str(bad), f"{VOCAB} entries"):
        llama(ids, labels=ids)
    assert not any(s.in_use for s in llama.source.slots)


def test_labels_shape_differs(llama):
    ids = torch.randint(0, VOCAB, (2, 8))
    with raises(ValueError, "labels has shape (2, 7)", "(2, 8)"):
        llama(ids, labels=ids[:, :7])
    with raises(ValueError, "attention_mask has shape (1, 8)", "(2, 8)"):
        llama(ids, attention_mask=torch.ones(1, 8, dtype=torch.long))


@pytest.mark.parametrize("bad", [VOCAB, -5])
def test_labels_outside_vocab(bad, llama):
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, 0] = -100  # ignored positions are fine
    labels[1, 2] = bad
    with raises(ValueError, f"labels hold {bad}", "-100"):
        llama(ids, labels=labels)
    with raises(ValueError, "labels must be an integer tensor", "float32"):
        llama(ids, labels=ids.float())


def test_sequence_longer_than_positions(llama):
    ids = torch.randint(0, VOCAB, (1, POSITIONS + 1))
    with raises(ValueError, f"sequence length {POSITIONS + 1}", f"{POSITIONS} positions"):
        llama(ids, labels=ids)


def test_input_ids_not_integer(llama):
    with raises(ValueError, "input_ids must be an integer tensor", "float32"):
        llama(torch.zeros(2, 8), labels=None)
    with raises(ValueError, "(batch, seq)", "(2, 2, 2)"):
        llama(torch.zeros(2, 2, 2, dtype=torch.long))


def test_trainer_reports_input_errors_and_recovers(llama):
    """A refused batch leaves the model usable: the next step runs and nothing is left bound."""
    opt = torch.optim.AdamW(llama.get_trainable_parameters(), lr=1e-2)
    trainer = llama.get_trainer(opt)
    with raises(ValueError, "labels has shape"):
        trainer.train_step(torch.randint(0, VOCAB, (2, 8)), labels=torch.randint(0, VOCAB, (2, 9)))
    ids = torch.randint(0, VOCAB, (2, 8))
    _, loss = trainer.train_step(ids, labels=ids)
    assert torch.isfinite(loss) and trainer.last_step_applied


# --------------------------------------------------------------------------- the API's own misuses
def test_the_trainer_refuses_an_optimizer_without_the_lora_weights(llama):
    """Training with an optimizer over other parameters would change nothing (and never zero the LoRA
    gradients): refused when the trainer is made; so are settings of the wrong type."""
    stray = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with raises(ValueError, "holds none of the model's LoRA parameters", "get_trainable_parameters()"):
        llama.get_trainer(stray)
    with raises(ValueError, "holds none of the model's LoRA parameters"):
        llama.get_trainer(None)
    opt = torch.optim.SGD(llama.get_trainable_parameters(), lr=0.1)
    for bad in (1.5, "2", True):
        with raises(ValueError, f"gradient_accumulation_steps={bad!r} must be a whole number >= 1"):
            llama.get_trainer(opt, gradient_accumulation_steps=bad)
    for bad in ("1", float("nan"), float("inf")):
        with raises(ValueError, f"max_grad_norm={bad!r} must be a finite number > 0"):
            llama.get_trainer(opt, max_grad_norm=bad)


def test_a_micro_batch_without_targets_contributes_nothing(tiny_dir, make_lema):
    """An accumulated step with one micro-batch whose labels are all -100 equals the step of the other alone
    (its NaN mean loss does not reach the gradients); a step of such micro-batches only is not applied."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    empty = torch.full_like(ids, -100)
    n = int((ids[:, 1:] != -100).sum())
    weights = []
    for accumulate in (True, False):
        model = make_lema(tiny_dir("llama"))
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1),
                                    gradient_accumulation_steps=2 if accumulate else 1)
        _, loss = trainer.train_step(ids, labels=ids, num_items_in_batch=n)
        if accumulate:
            _, nan = trainer.train_step(ids, labels=empty, num_items_in_batch=n)
            assert torch.isnan(nan) and trainer.last_step_applied
        assert torch.isfinite(loss)
        weights.append([p.detach().clone() for p in model.get_trainable_parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in model.get_trainable_parameters()]
    trainer.train_step(ids, labels=empty)  # nothing to learn: no step
    assert not trainer.last_step_applied and trainer.last_grad_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.get_trainable_parameters()))


def test_a_new_model_starts_as_peft_initialises_it(tiny_dir):
    """The LoRA weights are materialised empty: a model used before initialize_lora() starts from PEFT's
    initialisation (B zero: the base model's output), not from whatever the memory held."""
    with LemaModel(LemaConfig(model_name_or_path=tiny_dir("llama"), lora_rank=4, lora_alpha=8)) as model:
        params = dict(model.peft_model.named_parameters())
        assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if ".lora_B." in n)
        a = [p.detach().clone() for n, p in params.items() if ".lora_A." in n]
        assert all(torch.isfinite(p).all() and torch.count_nonzero(p) for p in a)
        model.initialize_lora(0)  # the same draw as the default
        assert all(torch.equal(x, p) for x, p in zip(a, (p for n, p in params.items() if ".lora_A." in n)))
        ids = torch.randint(0, VOCAB, (1, 8))
        assert torch.isfinite(model(ids, labels=ids).loss)


def test_a_closed_model_refuses_to_run_and_lets_go_of_its_files(tiny_dir, tmp_path):
    model = LemaModel(LemaConfig(model_name_or_path=tiny_dir("llama"), lora_rank=4, lora_alpha=8))
    fds = len(os.listdir("/proc/self/fd"))
    with model:  # a context manager: closed on the way out
        pass
    assert len(os.listdir("/proc/self/fd")) < fds  # the weights file's descriptor went with it
    ids = torch.randint(0, VOCAB, (1, 8))
    with raises(ValueError, "this LemaModel was closed"):
        model(ids)
    with raises(ValueError, "this LemaModel was closed"):
        model.generate(ids, max_new_tokens=2)
    model.save_adapter(str(tmp_path / "adapter"))  # the adapter is the model's own memory: still saved
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    model.close()  # twice: nothing more to do


def test_save_adapter_replaces_an_adapter_only(llama, tmp_path):
    """save_adapter replaces the folder it writes to whole: a folder with other files (a base model's, notes) is
    refused and kept as it was; an adapter folder is replaced; a file or an empty path is named."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with raises(ValueError, "holds other files than an adapter's", "notes.txt"):
        llama.save_adapter(str(work))
    assert os.listdir(work) == ["notes.txt"]
    llama.save_adapter(str(tmp_path / "adapter"))
    llama.save_adapter(str(tmp_path / "adapter"))  # again, over its own
    (tmp_path / "file").write_text("x")
    with raises(ValueError, "is a file; give a folder path"):
        llama.save_adapter(str(tmp_path / "file"))
    with raises(ValueError, "give a folder path for the adapter"):
        llama.save_adapter("")


def test_an_empty_sequence_is_named(llama):
    ids = torch.randint(0, VOCAB, (2, 8))
    with raises(ValueError, "with at least one token, got (2, 0)"):
        llama(ids[:, :0], labels=ids[:, :0])


def test_finite_gradients_past_float32s_norm_are_clipped_not_refused(llama):
    """Gradients of ~1e25 are finite, but their float32 sum of squares overflows: the norm is taken in float64,
    clipping scales them, and the step is applied (before, it was refused as "the gradient norm is inf")."""
    params = llama.get_trainable_parameters()
    trainer = llama.get_trainer(torch.optim.SGD(params, lr=1.0), max_grad_norm=1.0)
    params[0].register_hook(lambda g: torch.full_like(g, 1e25))
    before = [p.detach().clone() for p in params]
    ids = torch.randint(0, VOCAB, (1, 8))
    trainer.train_step(ids, labels=ids)
    assert trainer.last_step_applied and 1e25 < trainer.last_grad_norm < 1e28
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert torch.isfinite(moved).all() and 0 < float(torch.linalg.vector_norm(moved)) <= 1.0 + 1e-4  # lr x the clip
