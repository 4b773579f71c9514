"""The memory tracker counts what a Linear layer's step creates: its activations, gradients, copies and Adam state."""

from __future__ import annotations

import torch

from engine.memory import MemoryTracker, optimizer_state, storage_bytes

B, IN, OUT = 16, 64, 32
WEIGHT, BIAS = OUT * IN * 4, OUT * 4


def test_linear_step_by_component():
    torch.manual_seed(0)
    lin = torch.nn.Linear(IN, OUT)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    assert storage_bytes(lin.parameters()) == WEIGHT + BIAS
    with MemoryTracker(lin.named_parameters(), kv={"weight"}) as mem:
        x = torch.randn(B, IN)
        y = lin(x)
        loss = y.square().sum()  # addmm saves x, square saves y
        assert mem.held["activations"] == (B * IN + B * OUT) * 4
        loss.backward()
        assert mem.held["gradients"] == WEIGHT + BIAS  # the two .grad
        assert mem.most["activations"] == (B * IN + B * OUT) * 4
        del x, y, loss
        assert mem.held["activations"] == 0  # freed with the graph
        adapted = lin.weight - 0.1 * lin.weight.grad
        assert mem.held["copies"] == mem.held["kv copies"] == WEIGHT
        assert mem.most["gradients"] >= WEIGHT + BIAS + WEIGHT  # 0.1 * grad: a gradient while it lived
        del adapted
        mem.phase = "optimizer"
        opt.step()
        mem.phase = "step"
        opt.zero_grad(set_to_none=True)
    # Adam's state: two moments per parameter and a float32 step counter per parameter
    state = storage_bytes(optimizer_state(opt))
    assert state == 2 * (WEIGHT + BIAS) + 2 * 4
    assert mem.held["optimizer"] == 2 * (WEIGHT + BIAS)  # torch.tensor(0.0), the counters, is made without an op
    assert mem.held["gradients"] == mem.held["copies"] == 0
    assert mem.most["parameter-shaped"] >= 2 * WEIGHT + BIAS
    assert sum(v for k, v in mem.at_peak.items() if k not in ("kv copies", "parameter-shaped")) == mem.peak


def test_views_and_in_place_results_are_not_new_storage():
    with MemoryTracker([]) as mem:
        x = torch.zeros(100)
        x.add_(1.0)
        v = x[10:].view(10, 9)
        v.mul_(2.0)
        assert mem.total == 400 and mem.held["other"] == 400
        del x, v
    assert mem.total == 0 and mem.peak == 400


def test_double_backward_is_unchanged_under_the_tracker():
    """The saved-tensor hooks hand back detached tensors; a Hessian-vector product through tanh (which saves its
    output) must still be the one computed without them."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    x, v = torch.randn(4, 8), torch.randn(8, 8)

    def hvp():
        (g,) = torch.autograd.grad(torch.tanh(x @ w).pow(3).sum(), w, create_graph=True)
        return torch.autograd.grad(g, w, v)[0]

    plain = hvp()
    with MemoryTracker([("w", w)]) as mem:
        tracked = hvp()
    assert torch.equal(plain, tracked) and mem.most["activations"] > 0
