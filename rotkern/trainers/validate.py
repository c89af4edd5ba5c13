"""``rotkern validate``: eager RotatedAdamW against FusedRotatedAdamW, trained side by side.

For each scope, copies of one initial model see the same batches: fp32 eager, fp32 fused, and (for the
fp32-accurate precisions ieee / tf32x3) a float64 model with a float64 eager optimizer as the reference.
After every step we record the maximum relative parameter difference between eager and fused
(max |a - b| / max |a|, over tensors) and the loss difference, and check each parameter tensor with the
rule of ``rotkern.testing.assert_close_to_ref`` applied to error norms: ||fused - fp64|| <=
2 ||eager - fp64|| + floor sqrt(numel) ("fp32_floor"). A fixed fused-vs-eager tolerance would fail where
Adam is ill-conditioned (rotated gradients near eps), where both fp32 sides are equally far from the truth.
For tf32 the fused side is compared with the eager side directly under "fused_tf32". The command exits
non-zero past tolerance and says which backend each side actually ran (on a CPU without the Triton
interpreter the fused optimizer may run the eager path, which makes the comparison trivially exact).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..scopes import SCOPES
from ..testing import TOLERANCES
from .common import TrainerError
from .train import TrainConfig, make_optimizer, make_setup, optimizer_backend, train_step


@dataclass
class ValidateConfig(TrainConfig):
    # TrainConfig settings validate does not use: it steps the eager and the fused optimizer itself (scopes from
    # --scopes, no dynamic bases, no evaluation, no checkpoints)
    HIDDEN_OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "optimizer", "rotation", "svd_every", "precondition_every", "shampoo_beta", "max_precond_dim", "basis_change",
        "momentum", "switch_at", "switch_to", "switch_state", "stop_step", "eval_every", "eval_batches", "save_every",
        "save", "resume",
    })  # fmt: skip
    scopes: str = "none,global,layer,output,input"  # comma-separated scopes to validate
    steps: int = 10
    warmup_steps: int = 2
    out_dir: str = ""  # write validate.json here when set (never over an existing one)
    print_every: int = 1


def tolerance_key(precision: str) -> str:
    return "fused_tf32" if precision == "tf32" else "fused_fp32"


@torch.no_grad()
def compare_params(
    a: torch.nn.Module, b: torch.nn.Module, rtol: float, atol: float, ref: torch.nn.Module | None = None
) -> tuple[float, float, str]:
    """(max relative difference a vs b, worst tolerance ratio (pass <= 1), the worst tensor's name).

    Without ``ref``: ratio = max |a - b| / (atol + rtol |a|). With a float64 ``ref``: the Dao rule on each
    tensor's error norm, ratio = ||b - ref|| / (2 ||a - ref|| + atol sqrt(numel)). Norms, not maxima: Adam's
    update g/(|g| + eps) is ill-conditioned where a rotated gradient is near eps, so single coordinates of
    either fp32 side scatter at random around the float64 run; the norm is what a kernel error would move.
    """
    rel, ratio, worst = 0.0, 0.0, ""
    refs = ref.parameters() if ref is not None else (None for _ in a.parameters())
    for (name, pa), pb, pr in zip(a.named_parameters(), b.parameters(), refs, strict=True):
        x, y = pa.detach().double(), pb.detach().double()
        diff = (x - y).abs()
        rel = max(rel, (diff.max() / x.abs().max().clamp_min(1e-30)).item())
        if pr is None:
            q = (diff / (atol + rtol * x.abs())).max().item()
        else:
            t = pr.detach().double()
            q = (y - t).norm().item() / (2 * (x - t).norm().item() + atol * t.numel() ** 0.5)
        if q > ratio:
            ratio, worst = q, name
    return rel, ratio, worst


def validate(cfg: ValidateConfig) -> dict:
    scopes = [s.strip() for s in cfg.scopes.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise TrainerError(f"--scopes={cfg.scopes!r}: {', '.join(bad) or 'empty'}; choose from {', '.join(SCOPES)}")
    if cfg.switch_at or cfg.switch_to:
        raise TrainerError("validate runs each scope throughout; --switch_at/--switch_to belong to train")
    report_path = Path(cfg.out_dir) / "validate.json" if cfg.out_dir else None
    if report_path is not None and report_path.exists():
        raise TrainerError(f"{report_path} already exists; pick another --out_dir")
    key = tolerance_key(cfg.precision)
    rtol, atol = TOLERANCES[key]
    dao = key == "fused_fp32"  # fp32-accurate precisions: judge both fp32 sides against a float64 run
    if dao:
        key, (rtol, atol) = "fp32_floor (2x eager error vs float64)", TOLERANCES["fp32_floor"]
    base_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in base_fields})
    print(
        f"validate: {cfg.model}, {cfg.steps} steps per scope, precision {cfg.precision} -> tolerance '{key}' "
        f"(rtol {rtol:g}, atol {atol:g}), block {cfg.block_size}, seed {cfg.seed}"
    )
    results, passed = {}, True
    for scope in scopes:
        run = dataclasses.replace(base, rotation=scope, optimizer="rotated-fused")
        s = make_setup(run)
        model_a = s.build_model()
        model_b = copy.deepcopy(model_a)
        opt_a = make_optimizer(run, model_a, "rotated-eager")
        opt_b = make_optimizer(run, model_b, "rotated-fused")
        model_c = copy.deepcopy(model_a).double() if dao else None
        opt_c = make_optimizer(run, model_c, "rotated-eager", compute_dtype=torch.float64) if dao else None
        steps, ok = [], True
        for step in range(cfg.steps):
            ra = train_step(s, model_a, opt_a, step)
            rb = train_step(s, model_b, opt_b, step)
            rc = train_step(s, model_c, opt_c, step) if dao else None
            rel, ratio, worst = compare_params(model_a, model_b, rtol, atol, ref=model_c)
            dloss = abs(ra["loss"] - rb["loss"])
            if dao:
                loss_ok = abs(rb["loss"] - rc["loss"]) <= 2 * abs(ra["loss"] - rc["loss"]) + atol
            else:
                loss_ok = dloss <= atol + rtol * abs(ra["loss"])
            step_ok = ratio <= 1.0 and loss_ok
            ok &= step_ok
            steps.append(
                {
                    "step": step + 1,
                    "loss_eager": ra["loss"],
                    "loss_fused": rb["loss"],
                    "loss_diff": dloss,
                    "max_rel_param_diff": rel,
                    "tolerance_ratio": ratio,
                    "worst_param": worst,
                    "ok": step_ok,
                    "opt_time_eager": ra["optimizer_time"],
                    "opt_time_fused": rb["optimizer_time"],
                }
            )
            if cfg.print_every and ((step + 1) % cfg.print_every == 0 or not step_ok):
                print(
                    f"  {scope:>6} step {step + 1:3d} | loss {ra['loss']:.6f} vs {rb['loss']:.6f} "
                    f"(diff {dloss:.2e}) | max rel param diff {rel:.2e} | tol ratio {ratio:.3f}"
                    f"{'' if step_ok else ' FAIL at ' + worst}"
                )
        backends = {"eager": optimizer_backend(opt_a), "fused": optimizer_backend(opt_b)}
        results[scope] = {
            "ok": ok,
            "backends": backends,
            "steps": steps,
            "max_rel_param_diff": max(r["max_rel_param_diff"] for r in steps),
            "max_loss_diff": max(r["loss_diff"] for r in steps),
        }
        passed &= ok
        print(
            f"{scope:>8}: {'pass' if ok else 'FAIL'} | max rel param diff {results[scope]['max_rel_param_diff']:.2e}"
            f" | max loss diff {results[scope]['max_loss_diff']:.2e} | eager side: {backends['eager']} | fused "
            f"side: {backends['fused']}"
        )
    print(
        f"validate: {'passed' if passed else 'FAILED'} ({sum(r['ok'] for r in results.values())}/{len(scopes)} "
        f"scopes within '{key}')"
    )
    report = {
        "config": dataclasses.asdict(cfg),
        "tolerance": {"key": key, "rtol": rtol, "atol": atol},
        "device": str(s.device),
        "passed": passed,
        "scopes": results,
    }
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2))
    return report
