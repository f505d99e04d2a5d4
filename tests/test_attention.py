"""AutoInt's attention layers in C (train/_attention.h) compute deepctr's InteractingLayer: outputs and gradients."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train import _attention  # noqa: E402
from train._deepctr import AutoInt  # noqa: E402, F401  (imports deepctr without its version check)
from train.errors import TrainError  # noqa: E402
from train.fused import FusedForward, from_blocks, interacting_layers, to_blocks  # noqa: E402
from train.models import resolve_hyperparameters  # noqa: E402

from deepctr_torch.layers.interaction import InteractingLayer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(count: int, embedding: int, heads: int, res: bool, scaling: bool, seed: int) -> list:
    torch.manual_seed(seed)
    return [InteractingLayer(embedding, heads, use_res=res, scaling=scaling) for _ in range(count)]


def _run(layers, x: torch.Tensor, native: bool, weights: torch.Tensor):
    """Output, and the gradients of sum(output * weights) for x and every layer weight."""
    for layer in layers:
        for p in layer.parameters():
            p.grad = None
    x = x.clone().requires_grad_(True)
    out = interacting_layers(layers, x, native)
    (out * weights).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for layer in layers for p in layer.parameters()]


def _as_close(mine: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """``mine`` is as close to the float64 result ``exact`` as deepctr's own float32 result ``theirs`` is, up to
    float32 rounding (a gradient that is 0 in exact arithmetic comes out as rounding noise in both)."""
    error = (mine.double() - exact).abs().max()
    assert error <= 4 * (theirs.double() - exact).abs().max() + 1e-6 * exact.abs().max(), float(error)


def _check(layers, layers64, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The kernel's output and gradients against deepctr's modules in float32 and float64; returns the output."""
    theirs = _run(layers, x, False, weights)
    mine = _run(layers, x, True, weights)
    exact = _run(layers64, x.double(), False, weights.double())  # float64 layers never take the kernel
    _as_close(mine[0], theirs[0], exact[0])
    _as_close(mine[1], theirs[1], exact[1])
    for m, t, e in zip(mine[2], theirs[2], exact[2]):
        _as_close(m, t, e)
    assert torch.allclose(mine[0], theirs[0], atol=1e-6 * theirs[0].abs().max(), rtol=1e-5)
    return mine[0]


@pytest.mark.parametrize("batch, fields, embedding, heads, res, scaling", [
    (64, 19, 16, 4, True, False),    # the default AutoInt: the d = 4 kernels
    (13, 19, 16, 4, True, False),    # a batch that is not a multiple of 8: padded blocks
    (1, 3, 16, 4, True, False),      # one sample, few fields
    (21, 7, 16, 2, False, True),     # d = 8 (the general kernels), no residual, scaled scores
    (16, 5, 12, 1, True, True),      # one head of 12
])
def test_the_kernel_computes_deepctrs_interacting_layers_and_their_gradients(batch, fields, embedding, heads,
                                                                             res, scaling):
    layers = _layers(3, embedding, heads, res, scaling, seed=batch)
    layers64 = [layer.double() for layer in _layers(3, embedding, heads, res, scaling, seed=batch)]
    g = torch.Generator().manual_seed(fields)
    x = torch.randn((batch, fields, embedding), generator=g)
    out = _check(layers, layers64, x, torch.randn((batch, fields * embedding), generator=g))
    assert out.shape == (batch, fields * embedding)


def test_large_scores_saturate_the_softmax_as_torch_does():
    """Scores of several hundred: the row maximum is subtracted, exp underflows cleanly, nothing is NaN."""
    layers = _layers(1, 16, 4, True, False, seed=3)
    layers64 = [layer.double() for layer in _layers(1, 16, 4, True, False, seed=3)]
    g = torch.Generator().manual_seed(4)
    x = 40 * torch.randn((24, 19, 16), generator=g)
    out = _check(layers, layers64, x, torch.randn((24, 19 * 16), generator=g))
    assert torch.isfinite(out).all()


def test_blocks_round_trip_and_pad_with_zero_samples():
    x = torch.arange(11 * 3 * 4, dtype=torch.float32).view(11, 3, 4)
    blocked = to_blocks(x)
    assert blocked.shape == (4, 2, 3, _attention.CHUNK) and blocked.is_contiguous()
    assert blocked[2, 0, 1, 5] == x[5, 1, 2] and blocked[0, 1, 2, 2] == x[10, 2, 0]
    assert (blocked[:, 1, :, 3:] == 0).all()  # samples 11..15 are padding
    assert torch.equal(from_blocks(blocked, 11), x)


def test_the_wrappers_refuse_wrong_shapes():
    qkvr = np.zeros((64, 2, 19, 8), dtype=np.float32)
    out = np.zeros((16, 2, 19, 8), dtype=np.float32)
    saved = np.zeros(_attention.saved_size(16, 19, 4), dtype=np.float32)
    _attention.forward(qkvr, 4, True, 1.0, out, saved)
    with pytest.raises(ValueError, match="width 64 is not 3 x heads"):
        _attention.forward(qkvr, 4, False, 1.0, out, saved)
    with pytest.raises(ValueError, match="out must be"):
        _attention.forward(qkvr, 4, True, 1.0, np.zeros((16, 2, 18, 8), dtype=np.float32), saved)
    with pytest.raises(ValueError, match="saved must hold"):
        _attention.forward(qkvr, 4, True, 1.0, out, saved[:-1])
    with pytest.raises(ValueError, match="fields, 8"):
        _attention.forward(np.zeros((64, 4, 19, 4), dtype=np.float32), 4, True, 1.0, out, saved)
    with pytest.raises(ValueError, match="head width 80 is above"):
        _attention.forward(np.zeros((320, 2, 19, 8), dtype=np.float32), 1, True, 1.0,
                           np.zeros((80, 2, 19, 8), dtype=np.float32), saved)
    with pytest.raises(ValueError, match="dqkvr must be"):
        _attention.backward(out, out, qkvr, saved, 4, True, 1.0, np.zeros((48, 2, 19, 8), dtype=np.float32))


def test_fused_attention_is_a_checked_autoint_setting(monkeypatch):
    assert resolve_hyperparameters("autoint")["fused_attention"] is True
    assert resolve_hyperparameters("autoint", {"fused_attention": "false"})["fused_attention"] is False
    with pytest.raises(TrainError, match="'fused_attention': expected bool"):
        resolve_hyperparameters("autoint", {"fused_attention": "sometimes"})
    with pytest.raises(TrainError, match="'fused_attention' is not used by deepfm"):
        resolve_hyperparameters("deepfm", {"fused_attention": True})


@pytest.mark.parametrize("attention", [True, False])
def test_fused_attention_switches_the_kernel_in_the_training_forward(attention, monkeypatch):
    from bidder.spec import default_spec
    from train.models import build_model
    from train.optim import build_optimizer
    from train.trainer import training_forward

    hp = resolve_hyperparameters("autoint", {"dnn_hidden_units": [8], "att_layer_num": 1,
                                             "fused_attention": attention})
    model = build_model("autoint", default_spec(), hp, 0)
    optimizer = build_optimizer(model, hp)
    columns = max(stop for _, stop in model.feature_index.values())
    forward = training_forward(model, optimizer, hp, columns)
    assert isinstance(forward, FusedForward) and forward.attention is attention
    calls = []
    monkeypatch.setattr(_attention, "forward", lambda *args: calls.append(args) or _real_forward(*args))
    model.train()
    forward(torch.zeros((5, columns)))
    assert len(calls) == (1 if attention else 0)
    optimizer.finish()


_real_forward = _attention.forward
