"""Paper Prop. 2.2: SGD with momentum is rotation-equivariant, Adam is not."""

import pytest
import torch

from rotkern import RotatedAdamW, RotatedSGD, param_groups_for
from rotkern.testing import assert_close_to_ref

from ._models import MLP, batch_for, loss_of


def _trajectory(make_opt, steps=30):
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(2)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, batch_for(model, gen)).backward()
        opt.step()
        traj.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return torch.stack(traj)


@pytest.mark.parametrize("scope", ["global", "layer", "output", "input"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_rotated_sgdm_equals_sgdm(scope, nesterov):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    plain = _trajectory(lambda m: torch.optim.SGD(m.parameters(), foreach=False, **kw))
    rotated = _trajectory(lambda m: RotatedSGD(param_groups_for(m), rotation=scope, block_size=5, **kw))
    assert_close_to_ref(rotated, plain, "sgdm_equivariance", what=f"SGD-M {scope}")


def test_sgdm_in_rotated_coordinates_is_rotated_sgdm():
    """Run plain SGD-M on w = D theta (loss f(D^T w)) and map back: it is RotatedSGD's trajectory."""
    torch.manual_seed(0)
    model = MLP()
    opt = RotatedSGD(param_groups_for(model), rotation="global", block_size=4, lr=0.05, momentum=0.9)
    d = opt.rotation_matrix().float()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w = (d @ theta).requires_grad_()
    sgd = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        batch = batch_for(model, gen)
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        # Same loss, evaluated at theta = D^T w through functional_call.
        sgd.zero_grad()
        flat = d.T @ w
        named, off = {}, 0
        for n, p in model.named_parameters():
            named[n] = flat[off : off + p.numel()].view_as(p)
            off += p.numel()
        x, y = batch
        out = torch.func.functional_call(model, named, (x,))
        torch.nn.functional.mse_loss(out, y).backward()
        sgd.step()
    theta_t = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_close_to_ref(theta_t, (d.T @ w).detach(), "sgdm_equivariance", what="rotated coordinates")


def test_rotated_adam_is_not_equivariant():
    kw = dict(lr=0.01, weight_decay=0.0)
    plain = _trajectory(lambda m: torch.optim.AdamW(m.parameters(), foreach=False, **kw))
    rotated = _trajectory(lambda m: RotatedAdamW(param_groups_for(m), rotation="global", block_size=5, **kw))
    gap = (rotated - plain).abs().max().item()
    assert gap > 1e-2, f"rotated Adam should leave plain Adam's trajectory; max gap {gap:.2e}"
