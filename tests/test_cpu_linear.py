"""engine/cpu_linear.py: the frozen linear's products in either orientation give torch's numbers, and the
automatic choice times each shape once and keeps the faster (timed here with a clock the test controls)."""

from __future__ import annotations

import pytest
import torch

from lema.engine import cpu_linear
from lema.engine.cpu_linear import Orientations


def frozen_linear(bias: bool, orientations: Orientations) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80, bias=bias).requires_grad_(False)
    assert cpu_linear.install(orientations, lin) == 1
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["standard", "transposed"])
def test_both_orientations_give_torchs_linear(mode, bias):
    lin = frozen_linear(bias, Orientations(mode))
    x = torch.randn(3, 48, 7).transpose(1, 2).requires_grad_(True)  # (3, 7, 48), not contiguous
    y = lin(x)
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, lin.weight, lin.bias)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    assert y.shape == y_ref.shape == (3, 7, 80)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert lin.weight.grad is None


def test_trained_weight_falls_back_to_torch():
    """A weight that is trained needs its own gradient, which the frozen product does not give: F.linear runs."""
    o = Orientations("transposed")
    lin = frozen_linear(False, o)
    lin.weight.requires_grad_(True)
    lin(torch.randn(4, 48)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (80, 48)
    assert o.picked == {}


def test_auto_times_each_shape_once_and_keeps_the_faster(monkeypatch):
    now = [0.0]
    log = []

    def costing(which, i, cost):
        product = cpu_linear.PRODUCTS[which][i]

        def run(a, w):
            now[0] += cost
            log.append((which, i))
            return product(a, w)
        return run

    monkeypatch.setitem(cpu_linear.PRODUCTS, "forward", (costing("forward", 0, 2.0), costing("forward", 1, 1.0)))
    monkeypatch.setitem(cpu_linear.PRODUCTS, "backward", (costing("backward", 0, 1.0), costing("backward", 1, 3.0)))
    o = Orientations("auto", min_flops=0, repeats=2, clock=lambda: now[0])
    lin = frozen_linear(False, o)
    x = torch.randn(5, 48, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    key_f, key_b = ("forward", 5, 80, 48, torch.float32), ("backward", 5, 80, 48, torch.float32)
    assert o.picked == {key_f: 1, key_b: 0}
    assert o.timings == {key_f: (2.0, 1.0), key_b: (1.0, 3.0)}
    # interleaved, then the pick once more for the result (each output freed as soon as it is timed)
    assert log == [("forward", 0), ("forward", 1)] * 2 + [("forward", 1)] + [("backward", 0), ("backward", 1)] * 2 \
        + [("backward", 0)]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight), atol=1e-5, rtol=1e-5)

    log.clear()
    lin(torch.randn(5, 48, requires_grad=True)).sum().backward()  # the same shapes: no timing, the picks
    assert log == [("forward", 1), ("backward", 0)]
    lin(torch.randn(6, 48))  # another number of rows is another shape: timed
    assert len(o.timings) == 3 and log[2:] == [("forward", 0), ("forward", 1)] * 2 + [("forward", 1)]


@pytest.mark.parametrize("mode", ["auto", "standard"])
def test_small_products_and_standard_mode_run_torchs_linear(mode, monkeypatch):
    """Below MIN_FLOPS (auto), and always with $LEMA_CPU_LINEAR=standard, F.linear runs as without the module:
    nothing timed, the same bits."""
    def clock():
        raise AssertionError("timed a product")

    monkeypatch.setattr(cpu_linear, "_FrozenLinear", None)  # never reached
    o = Orientations(mode, min_flops=cpu_linear.MIN_FLOPS if mode == "auto" else 0, clock=clock)
    lin = frozen_linear(True, o)
    x = torch.randn(4, 48)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert o.picked == {} and o.timings == {}


def test_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "transposed")
    assert Orientations().mode == "transposed"
    monkeypatch.setenv(cpu_linear.ENV, "")
    assert Orientations().mode == "auto"
    monkeypatch.setenv(cpu_linear.ENV, "fastest")
    with pytest.raises(ValueError, match=r"LEMA_CPU_LINEAR='fastest'.*auto, standard, transposed"):
        Orientations()
