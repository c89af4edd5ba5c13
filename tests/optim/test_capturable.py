"""capturable=True: FusedRotatedAdamW's Triton step reads lr, betas, step counts and GradScaler's
tensors on the device and stages nothing on the host, so a CUDA graph can capture it and replay it with a changing
lr. On the CPU (Triton interpreter) the capturable step equals the plain one and reads no tensor value on the host;
the other backends and the dynamic scopes are refused before anything changes. The graph replay itself runs on a
GPU (``-m gpu``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import ext_available, triton_available

from ._host_reads import HostReads

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET and triton_available()
needs_interpreter = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (INTERPRET and triton_available()), reason="TRITON_INTERPRET=1"),
]


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 6)).to(device)


def _train_step(model, opt, x):
    opt.zero_grad(set_to_none=False)  # grads keep their addresses: what a captured graph needs
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("scope", ["none", "output", "global"])
@pytest.mark.parametrize("marks", [pytest.param(None, marks=needs_interpreter, id="triton")])
def test_capturable_step_equals_the_plain_one_and_reads_nothing_on_the_host(scope, marks):
    model, twin = _model(), _model()
    kw = dict(rotation=scope, block_size=8, backend="triton", precision="ieee")
    lr, betas = torch.tensor(1e-2), (torch.tensor(0.9), torch.tensor(0.95))
    opt = FusedRotatedAdamW(model.parameters(), lr=lr, betas=betas, capturable=True, **kw)
    ref_lr = torch.tensor(1e-2)
    # Float betas of the tensors' (fp32) values: the tensors read in the kernels are the floats on the host.
    ref = FusedRotatedAdamW(twin.parameters(), lr=ref_lr, betas=tuple(b.item() for b in betas), **kw)
    for t in range(6):
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(t))
        lr.fill_(1e-2 / (1 + t))  # a schedule written into the tensor, as a captured loop does
        ref_lr.fill_(1e-2 / (1 + t))
        with HostReads() as reads:
            _train_step(model, opt, x)
        _train_step(twin, ref, x)
        assert reads.count == 0, reads.ops
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_capturable_is_refused_where_the_step_cannot_be_replayed():
    model = _model()
    with pytest.raises(ValueError, match="capturable=True .* not supported by RotatedAdamW"):
        RotatedAdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        FusedRotatedAdamW(model.parameters(), capturable=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="param group 1: capturable=True with stochastic_rounding"):
        opt = FusedRotatedAdamW(list(model[0].parameters()), capturable=True)
        opt.add_param_group({"params": list(model[2].parameters()), "stochastic_rounding": True})


BACKENDS = [
    pytest.param("eager", "global", id="eager"),
    pytest.param(
        "ext", "global", marks=[pytest.mark.ext, pytest.mark.skipif(not ext_available(), reason="make ext")], id="ext"
    ),
    pytest.param("triton", "svd", marks=needs_interpreter, id="triton-svd"),
]


@pytest.mark.parametrize("backend,scope", BACKENDS)
def test_a_capturable_step_off_the_triton_kernels_raises_and_changes_nothing(backend, scope):
    model = _model()
    opt = FusedRotatedAdamW(model.parameters(), capturable=True, backend=backend, rotation=scope, block_size=8)
    model(torch.randn(3, 12)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"capturable=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


# -- on a GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize(
    "scope, precision",
    [("none", "tf32x3")] + [(s, p) for s in ("output", "layer", "global") for p in ("ieee", "tf32x3", "tf32")],
)
def test_captured_training_step_replays_like_eager_steps(scope, precision):
    """A whole training step (forward, backward, opt.step) captured once and replayed 10 times with a new lr and new
    data each time ends where the same steps run eagerly end, in every tl.dot precision (each its own kernels)."""
    device = torch.device("cuda")
    model = _model(device)
    twin = copy.deepcopy(model)
    kw = dict(rotation=scope, block_size=16, backend="triton", precision=precision)
    lr, ref_lr = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
    opt = FusedRotatedAdamW(model.parameters(), lr=lr, capturable=True, **kw)
    ref = FusedRotatedAdamW(twin.parameters(), lr=ref_lr, **kw)
    xs = torch.randn(13, 8, 12, device=device, generator=torch.Generator(device).manual_seed(0))
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state and the kernels' cached tables
        for t in range(3):
            static_x.copy_(xs[t])
            _train_step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(model, opt, static_x)
    for t in range(3):
        _train_step(twin, ref, xs[t])
    for t in range(3, 13):
        lr.fill_(1e-2 / (1 + t) ** 0.5)
        ref_lr.fill_(1e-2 / (1 + t) ** 0.5)
        static_x.copy_(xs[t])
        graph.replay()
        _train_step(twin, ref, xs[t])
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(opt.state[next(model.parameters())]["step"]) == 13


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="host syncs only exist with a CUDA device")
@pytest.mark.parametrize("scope", ["none", "global"])
def test_capture_without_a_warm_up_step_is_refused(scope):
    device = torch.device("cuda")
    model = _model(device)
    opt = FusedRotatedAdamW(model.parameters(), lr=torch.tensor(1e-2, device=device), capturable=True,
                            rotation=scope, block_size=16, backend="triton")  # fmt: skip
    x = torch.randn(8, 12, device=device)
    model(x).sum().backward()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"), torch.cuda.graph(graph):
        opt.step()


def test_a_loaded_capturable_flag_is_checked_at_the_step():
    """load_state_dict keeps the checkpoint's group flags (as torch's does): a capturable group loaded into an
    optimizer that cannot capture it is refused at step(), naming the fix, with nothing changed."""
    w = torch.nn.Parameter(torch.randn(6, 5))
    saved = FusedRotatedAdamW([w], capturable=True, rotation="none").state_dict()
    opt = RotatedAdamW([w], rotation="none")
    opt.load_state_dict(saved)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['capturable'\] = False"):
        opt.step()
    assert torch.equal(w, before) and not opt.state
    opt.param_groups[0]["capturable"] = False
    opt.step()
    assert not torch.equal(w, before)


@pytest.mark.parametrize("marks", [pytest.param(None, marks=needs_interpreter, id="triton")])
def test_a_loaded_capturable_flag_with_bf16_moments_is_refused(marks):
    w = torch.nn.Parameter(torch.randn(6, 5))
    saved = FusedRotatedAdamW([w], capturable=True, rotation="output", block_size=4, backend="triton").state_dict()
    opt = FusedRotatedAdamW([w], rotation="output", block_size=4, backend="triton", state_dtype=torch.bfloat16)
    opt.load_state_dict(saved)
    w.grad = torch.randn_like(w)
    with pytest.raises(RuntimeError, match="state_dtype=torch.bfloat16 or stochastic_rounding"):
        opt.step()
    assert not opt.state
