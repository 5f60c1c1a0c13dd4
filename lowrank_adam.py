"""lowrank_adam: memory-efficient low-rank Adam optimizers in one file.

Why these optimizers exist
--------------------------
Adam keeps two moments per weight, so for a model of N parameters its state
is 2N numbers: twice the model. For a 1B-parameter LLaMA that is 8 GB of
float32 state before a single activation is stored. Gradients of the big
weight matrices of a transformer are, however, close to low-rank, and the
methods in this file exploit that to keep far less state per matrix.

The methods (each class docstring has its algorithm box)
---------------------------------------------------------
* ``GaLoreAdamW`` (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
  Gradient Low-Rank Projection", arXiv:2403.03507). Every ``update_proj_gap``
  steps the top-r left singular vectors ``P`` of the gradient are computed;
  in between, Adam runs on the projected gradient ``Pᵀ G`` (r rows instead of
  m) and the update is projected back with ``P``. Every matrix gets the same
  rank r. This is the baseline the other methods are measured against.
* ``AdaptiveAdamW`` (the AdaptiveAdamW project, built on GaLore). The same
  projected Adam, but the ranks are not uniform: a global budget (the sum of
  the per-matrix ranks) is split greedily across matrices by how much of
  each gradient's spectrum the next singular value explains. When a subspace
  changes, the moments are rotated into the new basis (``M = P_newᵀ P_old``),
  and a norm-growth limiter caps how fast the update may grow.
* ``LDAdam`` (Robert et al., ICLR 2025, "LDAdam: Adaptive Optimization from
  Low-Dimensional Gradient Statistics", arXiv:2410.16103). The subspace is
  refreshed every step by one warm-started block power iteration; both Adam
  moments are transported into the new subspace in a projection-aware way,
  and a generalized error-feedback buffer re-injects whatever the projection
  of the gradient and of the momentum dropped.
* ``Adapprox`` (Zhao et al. 2024, "Adapprox: Adaptive Approximation in Adam
  Optimization via Randomized Low-Rank Matrices", arXiv:2403.14958). The
  first moment is kept as usual (optionally dropped); the *second* moment is
  stored as a rank-k factorization ``V ≈ Q Uᵀ`` refreshed each step by
  randomized subspace iteration (S-RSI), with k adapted to the measured
  approximation error, plus Adafactor-style update clipping.

Memory per m×n matrix (s = min(m, n), l = max(m, n); numbers of floats)
------------------------------------------------------------------------
    AdamW                 2·m·n
    GaLoreAdamW           2·r·l + s·r          (moments r×l, basis s×r)
    AdaptiveAdamW         2·r·l + s·r          (r varies per matrix)
    LDAdam                2·r·l + s·r + m·n    (+ error buffer; m·n/2 in bf16)
    Adapprox              k·(m + n) [+ m·n with a first moment]

Conventions (see SPEC §0)
-------------------------
* Orientation: the *short* side of a matrix is compressed. When m >= n we
  work with Gᵀ, so every projected algorithm below is written once for an
  "oriented" gradient X of shape (s, l), basis P of shape (s, r) and
  low-rank tensors of shape (r, l): ``project(X) = Pᵀ X``, ``back(Y) = P Y``.
* All linear algebra (SVD, QR, power iteration, S-RSI) runs in float32 or
  better, whatever the parameter dtype; optimizer state is float32 for
  bf16/fp16 parameters and survives ``load_state_dict`` in that dtype.
* Parameters outside a low-rank group (biases, norms, embeddings, the LM
  head) get exactly ``torch.optim.AdamW``'s update.
* State holds only tensors and plain numbers, so ``torch.load(...,
  weights_only=True)`` reads a checkpoint back and resuming is exact.

Public API::

    from lowrank_adam import (GaLoreAdamW, AdaptiveAdamW, LDAdam, Adapprox,
                              lowrank_groups, state_bytes)
"""

from __future__ import annotations

import heapq
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "GaLoreAdamW",
    "lowrank_groups",
    "state_bytes",
    "NonFiniteGradientError",
]


# =============================================================================
# 1. Pure math shared by every optimizer
# =============================================================================


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra runs in: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def is_transposed(shape: Sequence[int], proj_type: str = "std") -> bool:
    """Whether the oriented form of an (m, n) matrix is its transpose.

    ``std`` compresses the short side (m >= n -> work with Gᵀ), as GaLore's
    ``std`` rule does; ``reverse_std`` the long side; ``left`` always projects
    the rows (P is m×r), ``right`` always the columns (P is n×r).
    """
    m, n = shape
    return {"std": m >= n, "reverse_std": m < n, "left": False, "right": True}[proj_type]


def orient(x: Tensor, transposed: bool) -> Tensor:
    """(m, n) -> oriented (s, l) view; the same function undoes itself."""
    return x.T if transposed else x


def gradient_spectrum(x: Tensor, max_rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Thin SVD of an oriented matrix in float32: (left vectors, singular values).

    ``x = U diag(S) Vᵀ``; returns ``U[:, :max_rank]`` (orthonormal columns)
    and all of ``S`` (descending, >= 0). Finite for an all-zero ``x``.
    """
    u, s, _ = torch.linalg.svd(x.to(linalg_dtype(x.dtype)), full_matrices=False)
    return (u if max_rank is None else u[:, :max_rank]), s


def top_r_basis(x: Tensor, rank: int) -> Tensor:
    """P = top-r left singular vectors of x, shape (s, r), orthonormal columns."""
    return gradient_spectrum(x, rank)[0]


def orthonormalize(x: Tensor) -> Tensor:
    """Q of the thin QR of x in float32: orthonormal columns spanning x's range.

    Householder QR returns orthonormal columns even for a rank-deficient or
    all-zero ``x`` (the extra columns are then arbitrary but orthonormal).
    """
    return torch.linalg.qr(x.to(linalg_dtype(x.dtype)), mode="reduced").Q


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.AdamW`` step, operation for operation (single-tensor path).

    ``exp_avg``/``exp_avg_sq`` may be float32 for a bf16 parameter; the
    update is then computed in float32 and rounded once into the parameter.
    """
    # W <- W (1 - lr·wd)                       (decoupled weight decay)
    param.mul_(1 - lr * weight_decay)
    grad = grad.to(exp_avg.dtype)
    # m <- β1 m + (1-β1) g ;  v <- β2 v + (1-β2) g²
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # W <- W - lr/(1-β1ᵗ) · m / (sqrt(v)/sqrt(1-β2ᵗ) + eps)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    if param.dtype == exp_avg.dtype:
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    else:
        param.add_((exp_avg / denom).to(param.dtype), alpha=-lr / bias_correction1)


def adam_normalized_(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Projected Adam: update the moments with ``grad`` in place, return N.

    ``m <- β1 m + (1-β1) R``, ``v <- β2 v + (1-β2) R²``,
    ``N = (m / (1-β1ᵗ)) / (sqrt(v)/sqrt(1-β2ᵗ) + eps)`` (torch's eps placement).
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return (exp_avg / (1 - beta1**step)).div_(denom)


def rms(x: Tensor) -> Tensor:
    """Root mean square ‖x‖_F / sqrt(numel) as a 0-d tensor (no host sync)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def norm_growth_limit_(x: Tensor, prev_rms: Tensor, gamma: float) -> Tensor:
    """Scale ``x`` in place so that RMS(x) <= γ·prev_rms; return the new RMS.

    A ``prev_rms`` of 0 means "no history" (first step, or a zero update
    last time): then nothing is limited, so a zero step never freezes the
    parameter forever (our choice; the sources do not cover it).
    """
    cur = rms(x)
    cap = gamma * prev_rms
    factor = torch.where((prev_rms > 0) & (cur > cap), cap / cur.clamp_min(1e-30), torch.ones_like(cur))
    x.mul_(factor)
    return cur * factor


def apply_update_(param: Tensor, update: Tensor, transposed: bool, lr: float, weight_decay: float, alpha: float = 1.0) -> None:
    """W <- W (1 - lr·wd) - lr·α·D, where D is given in oriented form."""
    param.mul_(1 - lr * weight_decay)
    update = orient(update, transposed)
    if update.dtype != param.dtype:
        update = update.to(param.dtype)
    param.add_(update, alpha=-lr * alpha)


# =============================================================================
# 2. Validation and the shared Optimizer base
# =============================================================================


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; raised before anything is modified."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _validate_adam(group: dict) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    _check(lr >= 0.0, f"Invalid learning rate: {lr}")
    _check(eps > 0.0, f"Invalid epsilon value: {eps}")
    _check(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
    _check(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")
    _check(wd >= 0.0, f"Invalid weight_decay value: {wd}")


def _validate_rank(group: dict, proj_types: Iterable[str] = ("std",)) -> None:
    """Checks of a galore-style low-rank group (one with a ``rank`` key)."""
    rank = group["rank"]
    _check(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, f"Invalid rank: {rank}")
    for key in ("update_proj_gap",):
        if key in group:
            gap = group[key]
            _check(isinstance(gap, int) and gap >= 1, f"Invalid update_proj_gap: {gap}")
    if "proj_type" in group:
        _check(group["proj_type"] in proj_types, f"Invalid proj_type: {group['proj_type']!r} (expected one of {sorted(proj_types)})")
    for p in group["params"]:
        _check(p.dim() == 2, f"Invalid parameter in a 'rank' group: shape {tuple(p.shape)} is not 2-D "
                              "(put 1-D and other tensors in a group without 'rank')")


class _Base(Optimizer):
    """Machinery every optimizer here shares: input checks before touching
    anything, and state dtypes preserved through ``load_state_dict``."""

    def add_param_group(self, param_group: dict) -> None:
        # Validate the group as it will be (defaults filled in) before torch
        # registers it, so a bad group never half-joins the optimizer.
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        merged = {**self.defaults, **param_group, "params": params}
        for p in params:
            _check(not torch.is_complex(p), f"Complex parameters are not supported (shape {tuple(p.shape)})")
        self._validate_group(merged)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict) -> None:  # overridden per optimizer
        _validate_adam(group)

    @torch.no_grad()
    def _check_grads(self) -> None:
        """Raise, before any state or parameter changes, on a sparse, complex
        or non-finite gradient. Costs one host sync per step (not per tensor)."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)})")
                if torch.is_complex(p.grad):
                    raise RuntimeError(f"{type(self).__name__} does not support complex gradients "
                                       f"(parameter of shape {tuple(p.shape)})")
                grads.append(p)
        if not grads or not self.defaults.get("check_finite", True):
            return
        # max |g| per tensor is NaN/Inf iff the tensor holds one; stack per device, sync once.
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in grads:
            by_device.setdefault(p.grad.device, []).append(torch.linalg.vector_norm(p.grad, ord=math.inf).float())
        finite = all(bool(torch.stack(v).isfinite().all()) for v in by_device.values())
        if finite:
            return
        for group in self.param_groups:  # slow path: name the culprit
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    step = self.state[p].get("step", 0) + 1 if p in self.state else 1
                    raise NonFiniteGradientError(
                        f"{type(self).__name__}: non-finite gradient (NaN or Inf) for the parameter of shape "
                        f"{tuple(p.shape)} at its step {step}; nothing was updated. "
                        "Lower the learning rate, clip gradients, or use a GradScaler for fp16.")

    # -- state dtypes survive load_state_dict --------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``Optimizer.load_state_dict``, but floating state keeps the
        dtype it was saved in (torch casts it to the parameter's dtype, which
        would silently turn float32 moments of a bf16 model into bf16)."""
        dtypes = {k: {name: v.dtype for name, v in s.items() if isinstance(v, Tensor)}
                  for k, s in state_dict["state"].items()}
        extra = state_dict.get("extra")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "extra"})
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index in dtypes and p in self.state:
                    st = self.state[p]
                    for name, dtype in dtypes[index].items():
                        if isinstance(st.get(name), Tensor) and st[name].dtype != dtype:
                            st[name] = st[name].to(dtype)
                index += 1
        if extra is not None:
            self._load_extra(extra)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        extra = self._extra_state()
        if extra:
            sd["extra"] = extra
        return sd

    def _extra_state(self) -> dict:  # optimizer-wide state (e.g. RNG), overridden
        return {}

    def _load_extra(self, extra: dict) -> None:
        pass

    def ranks(self) -> list[int]:
        """Current rank of each low-rank parameter, in param-group order."""
        out = []
        for group in self.param_groups:
            if group.get("rank") is None:
                continue
            for p in group["params"]:
                st = self.state.get(p, {})
                out.append(st["rank"] if "rank" in st else self._initial_rank(p, group))
        return out

    def _initial_rank(self, p: Tensor, group: dict) -> int:
        return min(group["rank"], min(p.shape))

    def _clamped_rank(self, p: Tensor, group: dict) -> int:
        """The group's rank, clamped to min(m, n) with one warning per optimizer."""
        rank = group["rank"]
        if rank > min(p.shape) and not getattr(self, "_warned_clamp", False):
            self._warned_clamp = True
            warnings.warn(f"{type(self).__name__}: rank {rank} exceeds min(m, n) = {min(p.shape)} of a "
                          f"parameter of shape {tuple(p.shape)}; using rank {min(p.shape)} for such matrices "
                          "(warned once).", stacklevel=3)
        return min(rank, min(p.shape))

    def _dense_step(self, p: Tensor, group: dict) -> None:
        """The torch.optim.AdamW update for a parameter outside a low-rank group."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            dtype = linalg_dtype(p.dtype)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)  # m: first moment
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)  # v: second moment
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"],
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _closure(self, closure: Optional[Callable[[], float]]):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


# =============================================================================
# 3. GaLoreAdamW: uniform-rank gradient projection (the baseline)
# =============================================================================


class GaLoreAdamW(_Base):
    r"""AdamW with GaLore gradient low-rank projection (Zhao et al. 2024).

    For each parameter in a group with a ``rank`` key, with the gradient in
    oriented form X (s×l, s = min(m, n); see the module docstring)::

        if t ≡ 1 (mod T):  P ← top-r left singular vectors of X   (SVD, float32)
        R ← Pᵀ X                                   (r×l projected gradient)
        m ← β1 m + (1-β1) R ;  v ← β2 v + (1-β2) R²
        N ← m̂ / (sqrt(v̂) + ε)                      (Adam in the subspace)
        W ← W (1 - lr·wd) - lr · α · P N           (project back, scale α)

    Moments are left as they are when P changes (GaLore's behaviour). Every
    other parameter gets plain AdamW. Param groups follow galore-torch::

        groups = lowrank_groups(model, rank=128, update_proj_gap=200, scale=0.25)
        opt = GaLoreAdamW(groups, lr=1e-2)      # GaLore uses a high lr

    Group options: ``rank`` (int), ``update_proj_gap`` T (200), ``scale`` α
    (0.25), ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``).

    Not for: 1-D tensors, embeddings or small matrices (they gain nothing).
    Memory per low-rank matrix: ``2·r·l + s·r`` floats instead of ``2·m·n``.
    """

    proj_types = ("std", "reverse_std", "left", "right")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", check_finite: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale, proj_type=proj_type, check_finite=check_finite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        if group.get("rank") is not None:
            _validate_rank(group, self.proj_types)
            _check(group["scale"] > 0, f"Invalid scale: {group['scale']}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = self._closure(closure)
        self._check_grads()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("rank") is None:
                    self._dense_step(p, group)
                else:
                    self._galore_step(p, group)
        return loss

    def _galore_step(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        transposed = is_transposed(p.shape, group["proj_type"])
        x = orient(p.grad, transposed).to(linalg_dtype(p.dtype))  # X: (s, l)
        if len(state) == 0:
            state["step"] = 0
            state["rank"] = self._clamped_rank(p, group)
        t = state["step"] + 1
        # P ← top-r left singular vectors of X, on steps 1, T+1, 2T+1, ...
        if (t - 1) % group["update_proj_gap"] == 0:
            state["P"] = top_r_basis(x, state["rank"])  # (s, r)
        P = state["P"]
        if "exp_avg" not in state:
            state["exp_avg"] = x.new_zeros(P.shape[1], x.shape[1])  # m: (r, l)
            state["exp_avg_sq"] = x.new_zeros(P.shape[1], x.shape[1])  # v: (r, l)
        # R ← Pᵀ X
        r = P.T @ x
        beta1, beta2 = group["betas"]
        # m, v ← Adam moments of R ;  N ← m̂ / (sqrt(v̂) + ε)
        n = adam_normalized_(state["exp_avg"], state["exp_avg_sq"], r, t, beta1, beta2, group["eps"])
        # W ← W (1 - lr·wd) - lr · α · P N
        apply_update_(p, P @ n, transposed, group["lr"], group["weight_decay"], alpha=group["scale"])
        state["step"] = t


# =============================================================================
# 4. Helpers for users: param groups and state memory
# =============================================================================


def lowrank_groups(model: nn.Module, rank: int, *, targets: Sequence[str] = ("attn", "mlp"),
                   **group_options) -> list[dict]:
    """Param groups in the GaLore / LDAdam convention.

    The 2-D weights of ``nn.Linear`` modules whose qualified name contains one
    of ``targets`` go into a group ``{"params": ..., "rank": rank,
    **group_options}``; every other parameter (embeddings, norms, LM head,
    biases) into a plain group. Empty groups are left out.
    """
    lowrank, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in name for t in targets):
            w = module.weight
            if w.dim() == 2 and id(w) not in seen:
                seen.add(id(w))
                lowrank.append(w)
    rest = [p for p in model.parameters() if id(p) not in seen]
    groups = []
    if rest:
        groups.append({"params": rest})
    if lowrank:
        groups.append({"params": lowrank, "rank": rank, **group_options})
    return groups


def state_bytes(optimizer: Optimizer, by_key: bool = False):
    """Bytes held by the optimizer's state tensors.

    With ``by_key=True`` returns ``{state name: bytes}`` (e.g. ``exp_avg``,
    ``P``, ``error``) so a memory table can show what each part costs.
    """
    totals: dict[str, int] = {}
    for st in optimizer.state.values():
        for name, v in st.items():
            if isinstance(v, Tensor):
                totals[name] = totals.get(name, 0) + v.numel() * v.element_size()
    return totals if by_key else sum(totals.values())
