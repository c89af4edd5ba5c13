"""RotatedAdamW: AdamW in a rotated parameter space (paper Alg 4, Alg 5 for rotation="svd", SOAP for
rotation="eigen"), the eager fp32 reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..bases import BasisOptions, DynamicRotation
from ..kernels.dispatch import rotated_adamw
from ..scopes import DYNAMIC_SCOPES
from ._base import GroupStep, RotatedOptimizerBase, _label, _normalise_params, as_real, check_hyper, moment

__all__ = ["RotatedAdamW"]


class RotatedAdamW(RotatedOptimizerBase):
    """AdamW whose moments live in a seeded, permuted, block-rotated basis.

    (Long because a drop-in carries all of torch.optim.AdamW's observable surface: arguments, refusals, GradScaler
    and capture checks, and the dynamic bases' gradient checks, one method each.)

    Forward and backward stay in the standard basis. Each step the gradient is permuted and rotated,
    ``g~ = B(pi g)``; Adam's ``exp_avg`` and ``exp_avg_sq`` are updated on ``g~``; the update
    ``m^/(sqrt(v^)+eps)`` is rotated back, un-permuted and applied with decoupled weight decay in the
    standard basis (paper App. A.1-A.3). ``rotation="none"`` is exactly ``torch.optim.AdamW``.

    ``rotation="svd"`` is the paper's Alg 5 (paper Sec. 3.2, Alg. 5), the one dynamic scope: every 2-D weight
    (conv kernels as (out, in * kh * kw); q, k, v separately under ``split_qkv``; embeddings as stored) is
    rotated on both sides, ``g~ = L^T G R``, by the singular vectors of its current gradient
    ``G = U S V^T`` (after the ``maximize`` sign), completed to full orthogonal bases ``L = [U, U_perp]``,
    ``R = [V, V_perp]`` (see :class:`rotkern.bases.SvdRotation` for the O(n r) Householder completion).
    The bases are recomputed at steps 1, 1 + F, 1 + 2F, ... (F = ``svd_every``; the paper's first SVD at
    t = F leaves steps before it undefined), from the gradient of that step, in the compute dtype; m and v
    carry over unchanged across a basis change, as Alg 5 shows. The update ``L (m^/(sqrt(v^)+eps)) R^T`` is
    applied with decoupled weight decay in the standard basis. 1-D params follow ``vectors`` (unrotated under
    ``auto``). Cost: one SVD per matrix every F steps, plus two matmuls (or Householder products) per step.

    ``rotation="eigen"`` is SOAP (Vyas et al. 2024, arXiv 2409.11321): the same matrices, rotated by the
    eigenbases of EMAs of ``G G^T`` and ``G^T G`` (coefficient ``shampoo_beta``), first by ``eigh`` and refreshed
    every ``precondition_every`` steps by a power iteration and a QR; sides longer than ``max_precond_dim`` are
    the identity (:class:`rotkern.bases.EigenRotation` has the step order). With SOAP's hyperparameters
    (betas (0.95, 0.95), shampoo_beta 0.95, precondition_every 10, weight_decay 0.01) it is SOAP's update.

    At every basis change after the first, ``basis_change`` says what m and v do: ``keep`` (Alg 5; the svd
    default), ``transport`` (m rotated exactly, v by the squared change of basis), ``transport_m`` (m exactly, v
    kept: SOAP's, the eigen default) or ``reset``; ``auto`` picks the scope's default. A decomposition that fails
    is retried in float64, then on the CPU; if all fail the previous basis stays. Each fallback is counted in
    ``basis_stats`` and logged at WARNING (:mod:`rotkern.bases`).

    Arguments mirror :class:`torch.optim.AdamW` (same defaults); the keyword-only rotation options are
    defaults for every param group, and each group may override them.

    Args:
        foreach, fused: accepted for drop-in compatibility with torch.optim.AdamW and kept in the param groups;
            the implementation is rotkern's own (eager torch ops here, ``backend=`` in FusedRotatedAdamW).
        capturable: must be False here (ValueError otherwise); :class:`rotkern.FusedRotatedAdamW` implements it.
        differentiable: must be False (ValueError otherwise): not implemented.
        rotation: scope: ``none`` | ``global`` | ``layer`` | ``output`` | ``input`` | ``svd``.
        block_size: Haar block size n (default 768, the paper's).
        seed: rotation seed; the same seed gives the same rotations on any machine.
        structure: the static scopes' blocks: ``haar`` (Haar-random, the paper's; default) or ``hadamard``
            (randomized Walsh-Hadamard ``H D / sqrt(n)``, applied in O(n log n) per block by the eager step; needs a
            power-of-two ``block_size``; tails split into power-of-two blocks). Every backend runs both.
        split_qkv: rotate the thirds of fused QKV weights (role ``qkv``) as separate layers.
        embedding: ``as_linear`` (each token's row, paper C.2; the default) or ``transposed`` (paper B.1);
            see :mod:`rotkern.scopes`.
        vectors: policy for 1-D params: ``auto`` | ``rotate`` | ``none``.
        svd_every: F, the steps between SVD basis recomputes of ``rotation="svd"`` (default 250, the
            paper's, after GaLore); a positive int. Ignored by the other scopes.
        precondition_every: steps between eigenbasis refreshes of ``rotation="eigen"`` (default 10, SOAP's).
        shampoo_beta: EMA coefficient of the eigen scope's factors, in [0, 1) (default 0.95, SOAP's).
        max_precond_dim: eigen scope: a matrix side longer than this keeps no basis (identity; default 10000).
        basis_change: ``auto`` | ``keep`` | ``transport`` | ``transport_m`` | ``reset`` (see above).
        stochastic_rounding: bf16 / fp16 params are written by stochastic rounding of the fp32 result (to either
            neighbour, with probabilities that make the rounding unbiased) instead of round-to-nearest, so that
            updates below half an ulp still move them on average; the random draws come from the group's seed,
            the param's position and its step, so a run (and its resume) is deterministic. Every backend: the step
            runs on an fp32 copy of such params. No effect on fp32 / fp64 params.
        compute_dtype: None (default: float64 when any param given to the constructor is float64, as
            torch.optim.AdamW computes in the param's dtype; else float32), torch.float32 or torch.float64;
            moments (and SVD bases) are stored in this dtype whatever the param dtype. Params added later by
            ``add_param_group`` compute in the dtype chosen here.
        state_dtype: the dtype moments are stored in between steps: None (the compute dtype) or torch.bfloat16
            (half the memory of fp32 moments; lossy: every step still computes in the compute dtype, on copies of
            the moments, and rounds the new moments to nearest bf16, so updates of v smaller than half a bf16 ulp,
            about (1 - beta2) g^2 < 2^-9 v, are lost; measured in the README). Each group's step holds fp32 copies
            of its moments while it runs. Not with capturable=True.

    State per param (torch.optim.AdamW's keys): ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq``
    and with amsgrad ``max_exp_avg_sq``, each with the param's shape, holding the rotated-layout moments;
    ``basis_reset_at`` (scalar) after a ``reset`` basis change. Params of eigen units keep ``eigen_*`` tensors
    (:class:`rotkern.bases.EigenRotation`). Params of svd units also keep their current bases, in the compute
    dtype, pieces stacked on dim 0 (P = 3 for a split qkv weight, else 1; a (k, w) piece, r = min(k, w)):
    ``svd_u`` (P, k, r) and ``svd_v`` (P, w, r) hold U and V, or, for the side longer than r, the Householder
    reflectors of its completion, with their scalars in ``svd_u_tau`` / ``svd_v_tau`` (P, r). They go through
    ``state_dict`` like the moments, so a run resumes bit-identically across a basis change.
    """

    # torch.amp.GradScaler hands step() grad_scale and found_inf (and leaves the grads scaled), as to torch's fused
    # AdamW: the step unscales copies of the grads and skips itself entirely when found_inf is set.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        rotation: str = "global",
        block_size: int = 768,
        seed: int = 0,
        structure: str = "haar",
        split_qkv: bool = True,
        embedding: str = "as_linear",
        vectors: str = "auto",
        svd_every: int = 250,
        precondition_every: int = 10,
        shampoo_beta: float = 0.95,
        max_precond_dim: int = 10000,
        basis_change: str = "auto",
        stochastic_rounding: bool = False,
        compute_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        # Hyperparameters first, as torch.optim.AdamW checks them (its messages) before it looks at the params.
        _check_tensor_hypers(lr, betas, foreach=foreach, capturable=capturable)
        check_hyper("learning rate", lr, tensor_name="lr")
        check_hyper("epsilon value", eps)
        check_hyper("beta parameter at index 0", betas[0], 0.0, 1.0, tensor_name="betas[0]")
        check_hyper("beta parameter at index 1", betas[1], 0.0, 1.0, tensor_name="betas[1]")
        check_hyper("weight_decay value", weight_decay)
        params = _normalise_params(params)
        if compute_dtype is None:
            compute_dtype = torch.float64 if _has_float64(params) else torch.float32
        if state_dtype not in (None, compute_dtype, torch.bfloat16):
            raise ValueError(
                f"state_dtype must be None (the compute dtype, {compute_dtype}) or torch.bfloat16, got {state_dtype}"
            )
        self.state_dtype = compute_dtype if state_dtype is None else state_dtype
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            rotation=rotation,
            block_size=block_size,
            seed=seed,
            structure=structure,
            split_qkv=split_qkv,
            embedding=embedding,
            vectors=vectors,
            svd_every=svd_every,
            precondition_every=precondition_every,
            shampoo_beta=shampoo_beta,
            max_precond_dim=max_precond_dim,
            basis_change=basis_change,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults, compute_dtype)

    _moment_keys = ("exp_avg", "exp_avg_sq")
    _supports_dynamic = True
    # Whether capturable=True is accepted (FusedRotatedAdamW: its Triton step reads everything on the device).
    _supports_capturable = False

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        check_hyper("learning rate", group["lr"], where=where, tensor_name="lr")
        check_hyper("epsilon value", group["eps"], where=where)
        betas = group["betas"]
        _check_tensor_hypers(
            group["lr"], betas, foreach=group.get("foreach"), capturable=group.get("capturable", False), where=where
        )
        check_hyper("beta parameter at index 0", betas[0], 0.0, 1.0, where=where, tensor_name="betas[0]")
        check_hyper("beta parameter at index 1", betas[1], 0.0, 1.0, where=where, tensor_name="betas[1]")
        check_hyper("weight_decay value", group["weight_decay"], where=where)
        if not isinstance(group.get("stochastic_rounding", False), bool):
            raise ValueError(f"{where}stochastic_rounding must be a bool, got {group['stochastic_rounding']!r}")
        if group.get("differentiable"):
            raise ValueError(
                f"{where}differentiable=True (autograd through the step) is not supported by rotkern's optimizers; "
                "pass differentiable=False"
            )
        if group.get("capturable") and not self._supports_capturable:
            raise ValueError(
                f"{where}capturable=True (CUDA-graph capture of the step) is not supported by {type(self).__name__}; "
                "use FusedRotatedAdamW (its Triton step is capturable), or pass capturable=False"
            )
        if group.get("capturable") and self.state_dtype != self.compute_dtype:
            raise ValueError(
                f"{where}capturable=True with state_dtype={self.state_dtype}: the step would stage the moments "
                "through new fp32 copies, whose addresses a captured graph cannot follow; keep fp32 moments"
            )
        if group.get("capturable") and group.get("stochastic_rounding"):
            raise ValueError(
                f"{where}capturable=True with stochastic_rounding=True: the rounding draws its random bits on the "
                "host each step, which a captured graph would replay unchanged; pass one of them as False"
            )

    def _plan_backend(self, plan: GroupStep) -> None:
        group = plan.group
        if not self._supports_capturable and _capturable(group):
            # The constructor and add_param_group refuse it; a loaded checkpoint keeps its groups' flags, as torch's.
            raise RuntimeError(
                f"param group {plan.gi} has capturable=True (from a loaded checkpoint?), which {type(self).__name__} "
                f"does not implement: set optimizer.param_groups[{plan.gi}]['capturable'] = False, or use "
                "FusedRotatedAdamW"
            )
        if group["rotation"] not in DYNAMIC_SCOPES:
            return
        # A basis cannot come from a non-finite gradient (an SVD cannot converge; an eigen factor would keep the
        # NaN forever, it takes in every gradient): refuse before any state changes.
        params = group["params"]
        opts = BasisOptions(svd_every=group["svd_every"])
        for unit in plan.units:
            if not isinstance(unit.rotation, DynamicRotation):
                continue
            i = unit.params[0]
            st = self.state.get(params[i])
            step = (float(st["step"]) if st else 0.0) + 1
            rot = unit.rotation
            if rot.needs_finite_grad(int(step), opts) and not bool(torch.isfinite(plan.grads[i]).all()):
                # a family that takes in every gradient (eigen) needs it at every step; svd at its recomputes
                every = rot.needs_finite_grad(2, BasisOptions(svd_every=2))
                when = "" if every else f" at an {rot.scope.upper()} basis recompute step"
                raise ValueError(
                    f"{_label(group['names'], plan.gi, i)}: the gradient has non-finite values{when} (step "
                    f"{int(step)}); rotation={group['rotation']!r} cannot compute a basis from it (skip the step, "
                    "e.g. with torch.amp.GradScaler, or clip the gradient)"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. closure: re-evaluates the model and returns the loss.

        Every group is checked before any is stepped: an error leaves params and state unchanged.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler (this class sets _step_supports_amp_scaling): it leaves the grads scaled and hands
        # over grad_scale (None once unscale_ ran) and found_inf; a step with an inf/NaN grad changes nothing. The
        # fused kernels take both as device tensors (no host sync, as torch's fused AdamW); any other step reads
        # found_inf on the host (a sync on CUDA) and unscales copies of the grads. The dynamic scopes check their
        # gradients while planning, so for them the host read comes first.
        if _capturing() and not all(g["capturable"] for g in self.param_groups):
            raise RuntimeError(
                f"Attempting CUDA graph capture of step() for an instance of {type(self).__name__} but param_groups' "
                "capturable is False (pass capturable=True to FusedRotatedAdamW)"
            )
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        host_read = found_inf is not None and not self._may_scale_in_kernel()
        if host_read and bool(found_inf):
            return loss
        plans = self._plan_steps()
        in_kernel = (found_inf is not None or grad_scale is not None) and all(map(self._scales_in_kernel, plans))
        if found_inf is not None and not (in_kernel or host_read) and bool(found_inf):
            return loss
        scaling = {}
        self._grad_scale = None
        if in_kernel:
            scaling = dict(grad_scale=grad_scale, found_inf=found_inf)
        elif grad_scale is not None:
            self._grad_scale = torch.as_tensor(grad_scale, dtype=torch.float32)
        for plan in plans:
            group = plan.group
            run = self._run_group(plan, ("max_exp_avg_sq",) if group["amsgrad"] else ())
            if found_inf is not None and in_kernel and plan.empty:  # zero-size params counted a step: take it back
                steps = [self.state[group["params"][i]]["step"] for i in plan.empty]
                torch._foreach_sub_(steps, [found_inf.to(s.device, s.dtype).reshape(()) for s in steps])
            if run is None:
                continue
            params, grads, states = run
            beta1, beta2 = group["betas"]
            # Dynamic units keep their bases in the param state; other scopes' steps never see these arguments.
            svd = {}
            if group["rotation"] in DYNAMIC_SCOPES:
                svd = dict(
                    svd_bases=states,
                    svd_every=group["svd_every"],
                    precondition_every=group["precondition_every"],
                    shampoo_beta=_scalar(group["shampoo_beta"]),
                    basis_change=group["basis_change"],
                    basis_stats=self.basis_stats,
                )
            step_fn = self._sharded_adamw if plan.extra.get("sharded") else self._rotated_adamw
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
            stored = [[s and as_real(moment(s, k)) for s in states] for k in keys]
            # state_dtype=bf16: the step runs on compute-dtype copies, rounded back to the stored dtype after it.
            moments = stored if self.state_dtype == self.compute_dtype else [
                [t if t is None else t.to(self.compute_dtype) for t in ts] for ts in stored
            ]  # fmt: skip
            step_fn(
                plan,
                params,
                grads,
                moments[0],
                moments[1],
                moments[2] if group["amsgrad"] else None,
                [s and s["step"] for s in states],
                plan.units,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decay_mask=group["decay_mask"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                **svd,
                **scaling,
            )
            if moments is not stored:
                for ts, copies in zip(stored, moments, strict=True):
                    for t, c in zip(ts, copies, strict=True):
                        if t is not None:
                            t.copy_(c)
            self._finish_group(plan)
        return loss

    # Under torch.compile(opt.step) the reference runs outside the graph: it reads each unit's step count and
    # builds rotations on the host (a graph break per unit), and Dynamo's automatic dynamic shapes over those
    # many small frames fail in torch's guard code ("sources must not be empty") once two optimizers compile
    # their own steps. The fused backends override this with one op that compiles without a break.
    @torch._disable_dynamo
    def _rotated_adamw(
        self, plan: GroupStep, *args, lr: float | torch.Tensor, beta1: float | torch.Tensor,
        beta2: float | torch.Tensor, **kwargs,
    ) -> None:  # fmt: skip
        """The functional step; subclasses swap in a fused implementation with this signature.

        ``lr`` and the betas are the group's as given (tensors stay tensors, so fused steps can read them on the
        device); ``grad_scale`` / ``found_inf`` come only where :meth:`_scales_in_kernel` said so.
        """
        rotated_adamw(*args, backend="eager", lr=_scalar(lr), beta1=_scalar(beta1), beta2=_scalar(beta2), **kwargs)

    def _may_scale_in_kernel(self) -> bool:
        """Whether a step could take GradScaler's tensors into its kernels (decided before planning)."""
        return False

    def _scales_in_kernel(self, plan: GroupStep) -> bool:
        """Whether this group's step unscales and skips on found_inf inside its kernels."""
        return False


def _capturable(group: dict) -> bool:
    """A group's capturable flag. Inside torch.compile, Dynamo shows every param group of an optimizer with
    capturable=True (it assumes a compiled step syncs nothing); the group's own setting is only known outside it."""
    return bool(group.get("capturable")) and not torch.compiler.is_compiling()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _scalar(x: float | torch.Tensor) -> float:
    return x.item() if torch.is_tensor(x) else float(x)


def _check_tensor_hypers(lr: Any, betas: Any, *, foreach: bool | None, capturable: bool, where: str = "") -> None:
    """torch.optim.AdamW's refusals of tensor hyperparameters, in its words: a script that torch refuses is
    refused here too (foreach=True is only kept for compatibility, but a drop-in refuses what AdamW refuses)."""
    if torch.is_tensor(lr) and foreach and not capturable:
        raise ValueError(f"{where}lr as a Tensor is not supported for capturable=False and foreach=True")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    if torch.is_tensor(betas[0]) != torch.is_tensor(betas[1]):
        raise ValueError(f"{where}betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if torch.is_tensor(beta) and foreach and not capturable:
            raise ValueError(f"{where}betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")


def _has_float64(groups: list) -> bool:
    """Whether any param of the constructor's groups (tensors or (name, tensor) pairs) is float64."""
    for g in groups:
        params = g["params"] if isinstance(g, dict) else g
        params = [params] if isinstance(params, torch.Tensor) else params
        for p in params:
            t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float64, torch.complex128):
                return True
    return False
