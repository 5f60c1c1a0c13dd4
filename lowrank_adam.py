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
  changes, the moments are rotated into the new basis (``C = P_newᵀ P_old``).
  By default it also adds the part of the gradient the subspace drops,
  rescaled like the Adam update (Fira-style, chosen by measurement), and a
  norm-growth limiter caps how fast that residual may grow.
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
    Adapprox              (k+1)·(m + n) + 1 [+ m·n with a first moment]   (m·n + 1 at k = s)

Conventions
-----------
* Orientation: the *short* side of a matrix is compressed. When m >= n we
  work with Gᵀ, so every projected algorithm below is written once for an
  "oriented" gradient X of shape (s, l), basis P of shape (s, r) and
  low-rank tensors of shape (r, l): ``project(X) = Pᵀ X``, ``back(Y) = P Y``.
  A square matrix is transposed by GaLore's rule (GaLoreAdamW,
  AdaptiveAdamW) and not by LDAdam's official code, which LDAdam follows.
* All linear algebra (SVD, QR, power iteration, S-RSI) runs in float32 or
  better, whatever the parameter dtype (float64 for float64 parameters and,
  by default, for Adapprox's V);
  optimizer state is float32 for bf16/fp16 parameters, and
  ``load_state_dict`` restores it with its saved values (torch's own would
  round it to the parameter's dtype). State tensors are kept contiguous
  (and made so when loaded), so a resumed run rounds as the uninterrupted one.
* Where they run: eager or ``torch.compile`` (compiled steps equal eager
  ones to float32 rounding), one process, DDP, ZeRO-1, and FSDP2: each
  matrix is then stepped whole on one owner rank, which alone holds its
  state (``fsdp2_step``, section 7). FSDP1 parameters (flattened to 1-D)
  are refused rather than silently trained as AdamW.
* Param-group dicts are copied, never mutated; a group key the optimizer
  does not honour (a misspelling, another optimizer's option) is refused,
  not ignored, and so is another optimizer's state dict.
* Parameters outside a low-rank group (biases, norms, embeddings, the LM
  head) get exactly ``torch.optim.AdamW``'s update.
* State holds only tensors and plain numbers, all of it per parameter (so
  ``torch.distributed.checkpoint``'s helpers keep it), ``torch.load(...,
  weights_only=True)`` reads a checkpoint back and resuming is exact.
  Randomness is counter-based (``stream_seed``): the same on every DDP rank.

Requires torch >= 2.5 (tested with 2.13.0).

How this file is laid out (and how to copy one optimizer out of it)
--------------------------------------------------------------------
Sections 1 and 2 are the shared core: pure math used by every optimizer,
then input checks and the ``_Base`` optimizer (param groups, the NaN check,
exact ``load_state_dict``, plain AdamW for the dense parameters). Each of
sections 3-6 holds one optimizer with the math only it uses, and needs
nothing but the core. To use one optimizer in your own code, copy the
imports, sections 1-2 and that optimizer's section; section 7's helpers
(``lowrank_groups``, ``layerwise_hooks``, ``state_bytes``, and FSDP2's
owner-rank layer) also need only the core. Each class has one step method that follows its algorithm box
line by line, with the box's letters as variable names.

Public API::

    from lowrank_adam import (GaLoreAdamW, AdaptiveAdamW, LDAdam, Adapprox,
                              lowrank_groups, layerwise_hooks, state_bytes)
"""

from __future__ import annotations

import heapq
import inspect
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

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


PROJ_TYPES = ("std", "reverse_std", "left", "right")


def orient(x: Tensor, transposed: bool) -> Tensor:
    """(m, n) -> oriented (s, l) view; the same function undoes itself."""
    return x.T if transposed else x


def oriented_grad(p: Tensor, transposed: bool) -> Tensor:
    """X: the gradient of ``p`` in oriented form (s, l), in float32 or better."""
    return orient(p.grad, transposed).to(linalg_dtype(p.dtype))


def gradient_spectrum(x: Tensor, max_rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Thin SVD of an oriented matrix in float32: (left vectors, singular values).

    ``x = U diag(S) Vᵀ``; returns ``U[:, :max_rank]`` (orthonormal columns,
    contiguous: a column slice would keep all of U alive, and be saved whole
    by ``torch.save``) and all of ``S`` (descending, >= 0). Finite for an
    all-zero ``x``.
    """
    x = x.to(linalg_dtype(x.dtype))
    if x.shape[0] <= x.shape[1]:
        # LAPACK is markedly faster on the tall orientation (about 1.7× on CPU
        # for 512×1376): the left vectors of x are the right vectors of xᵀ.
        _, s, vh = torch.linalg.svd(x.T, full_matrices=False)
        u = vh.T
    else:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return (u if max_rank is None else u[:, :max_rank].contiguous()), s


def refresh_due(t: int, index: int, group: dict) -> bool:
    """Whether matrix ``index`` refreshes its basis at its step t: at t = 1,
    then every T = ``update_proj_gap`` steps, at t ≡ 1 (mod T) as in GaLore,
    or with ``stagger`` at t ≡ 1 + (index mod T): about 1/T of the matrices
    a step. The offset depends on the index and T alone (every rank agrees)."""
    gap = group["update_proj_gap"]
    offset = index % gap if group.get("stagger") else 0
    return t == 1 or (t - 1 - offset) % gap == 0


REFRESH_OVERSAMPLE = 8  # extra sketch columns of GaLoreAdamW's and AdaptiveAdamW's refresh="randomized"


def randomized_spectrum(x: Tensor, width: int, warm: Optional[Tensor], generator: torch.Generator,
                        power_iters: int = 1) -> tuple[Tensor, Tensor]:
    """Leading left singular vectors and values of an oriented matrix, from a
    warm-started randomized range finder (Halko, Martinsson and Tropp 2011)::

        Q ← [P_prev, Ω]                s×k: the previous basis, topped up with
                                       Gaussian columns Ω to k = width
        Q ← orth(X (Xᵀ Q))             ``power_iters`` times (subspace iteration;
                                       with none, Q ← orth(Q))
        B ← Qᵀ X = U_B diag(S) V_Bᵀ     a small k×l SVD (through the QR of Bᵀ)
        U ← Q U_B                      s×k, orthonormal; S: k values, descending

    Costs about 2·(power_iters + 1)·s·l·k multiply-adds and a k×l SVD, where
    the exact SVD costs O(s²·l). The values are those of X restricted to the
    span of Q, so they never exceed X's; the basis is exact when X has rank
    at most k (with power_iters >= 1). ``warm`` may be None or have any
    number of columns; only its first ``width`` are used, and the leading
    columns of U are signed to agree with them (our choice, see below).
    """
    x = x.to(linalg_dtype(x.dtype))
    k = min(width, x.shape[0])
    columns = [] if warm is None else [warm[:, :k].to(x.dtype)]
    missing = k - (0 if warm is None else columns[0].shape[1])
    if missing > 0:
        columns.append(torch.randn(x.shape[0], missing, generator=generator, device=generator.device, dtype=x.dtype))
    # (with an iteration to come, its QR orthonormalizes; the start needs none)
    q = torch.cat(columns, dim=1) if power_iters > 0 else orthonormalize(torch.cat(columns, dim=1))
    for _ in range(power_iters):
        y = x.T @ q  # l×k; rescaled so that X Y cannot overflow where X Xᵀ would (|X| > 2^64 in float32)
        q = orthonormalize(x @ y.div_(y.abs().amax().clamp_min(torch.finfo(y.dtype).tiny)))
    # B = Qᵀ X, k×l; its SVD through the QR of Bᵀ = Q_B R, since B = Rᵀ Q_Bᵀ has
    # the left vectors and values of the k×k matrix Rᵀ (about 4× faster on CPU)
    r = torch.linalg.qr((q.T @ x).T, mode="r").R
    u_b, s, _ = torch.linalg.svd(r.T)
    u = q @ u_b
    if warm is not None:
        align_signs_(u, warm)
    return u.contiguous(), s


def top_r_basis(x: Tensor, rank: int) -> Tensor:
    """P = top-r left singular vectors of x, shape (s, r), orthonormal columns."""
    return gradient_spectrum(x, rank)[0]


def align_signs_(u: Tensor, prev: Tensor) -> Tensor:
    """Flip columns of ``u`` in place so that each agrees in sign with the same
    column of ``prev`` (``u_jᵀ prev_j >= 0``, over their common columns).

    A singular vector's sign is arbitrary: LAPACK's choice depends on the
    dtype, the device and the orientation. Moments that stay in place across
    a refresh (GaLore keeps them) are coordinates in the basis, so a flipped
    column would reverse that row of the first moment. Signed like the
    previous basis, they keep their direction where P barely moved, and a
    run no longer depends on the linear-algebra library (our choice).
    """
    j = min(u.shape[1], prev.shape[1])
    agree = (u[:, :j] * prev[:, :j].to(u.dtype)).sum(dim=0)
    u[:, :j] *= torch.where(agree < 0, -1.0, 1.0).to(u.dtype)
    return u


def resize_rows(x: Tensor, rows: int) -> Tensor:
    """First ``rows`` rows of x, zero-padded when x has fewer (a rank changed)."""
    out = x.new_zeros(rows, x.shape[1])
    k = min(rows, x.shape[0])
    out[:k] = x[:k]
    return out


def orthonormalize(x: Tensor) -> Tensor:
    """Q of the thin QR of x in float32: orthonormal columns spanning x's range.

    Householder QR returns orthonormal columns even for a rank-deficient or
    all-zero ``x`` (the extra columns are then arbitrary but orthonormal).
    """
    return torch.linalg.qr(x.to(linalg_dtype(x.dtype)), mode="reduced").Q


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finalizer: a well-spread 64-bit hash of the integer x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, *counters: int) -> int:
    """Seed of one random draw from the optimizer's ``seed`` and counters
    (a parameter's index, a step).

    Counter-based randomness: each draw depends on these integers alone, not
    on a device, a process or earlier draws. So every DDP rank draws the same
    numbers, a checkpoint needs no generator state (only the integers, which
    live in the per-parameter state), and a checkpoint moves between devices
    (CUDA -> CPU) without a generator that does not exist there.
    """
    x = _splitmix64(seed & _MASK64)
    for c in counters:
        x = _splitmix64(x ^ (c & _MASK64))
    return x >> 1  # 63 bits: any torch.Generator accepts it


def orthonormalize_signed(x: Tensor) -> Tensor:
    """Q of the thin QR of x with diag(R) >= 0: the orthonormal basis closest
    to x's own columns (no arbitrary sign flips), and Haar-distributed when x
    is Gaussian (Mezzadri 2007)."""
    q, r = torch.linalg.qr(x.to(linalg_dtype(x.dtype)), mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    # contiguous: LAPACK's Q is column-major, and a basis kept in the state must
    # have the layout a loaded checkpoint gives it, or matmuls round differently
    return (q * torch.where(sign == 0, torch.ones_like(sign), sign)).contiguous()


def adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """``torch.optim.AdamW``'s update for a list of tensors, operation for
    operation, with torch's multi-tensor (``_foreach``) kernels: one call per
    operation for the whole list, not one per tensor (on a GPU a model's many
    small tensors are otherwise bound by kernel launches).

    All tensors of one call share a device; the moments may be float32 for
    bf16 parameters: the update is then computed in float32 and rounded once
    into each parameter. ``steps`` are the per-tensor step counts (t).
    """
    # W <- W (1 - lr·wd)                       (decoupled weight decay)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]  # no copy when the dtypes agree
    # m <- β1 m + (1-β1) g ;  v <- β2 v + (1-β2) g²
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # W <- W - lr/(1-β1ᵗ) · m / (sqrt(v)/sqrt(1-β2ᵗ) + eps)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    step_size = [-lr / (1 - beta1**t) for t in steps]
    same = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if p.dtype == m.dtype]
    mixed = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if p.dtype != m.dtype]
    pick = lambda xs, idx: [xs[i] for i in idx]
    if same:  # torch's own last operation
        torch._foreach_addcdiv_(pick(params, same), pick(exp_avgs, same), pick(denom, same), pick(step_size, same))
    if mixed:  # a bf16/fp16 parameter with float32 moments: the update in float32, rounded once
        updates = torch._foreach_div(pick(exp_avgs, mixed), pick(denom, mixed))
        torch._foreach_mul_(updates, pick(step_size, mixed))
        torch._foreach_add_(pick(params, mixed), [u.to(p.dtype) for u, p in zip(updates, pick(params, mixed))])


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


@torch.compiler.disable  # a host sync: under torch.compile a quiet graph break, not a warning block
def is_all_zero(x: Tensor) -> bool:
    """Whether every entry of x is 0 (one host sync)."""
    return not bool(x.any())


@torch.compiler.disable  # as is_all_zero
def all_finite(xs: list[Tensor]) -> bool:  # (one host sync per tensor)
    return all(bool(x.isfinite().all()) for x in xs)


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


def back_project(P: Tensor, y: Tensor, transposed: bool, out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """``back(Y) = P Y``, returned in the *parameter's* layout: ``Yᵀ Pᵀ`` when
    the matrix was transposed. Producing the product directly in that layout
    avoids adding a transposed (strided) full-size tensor to the parameter,
    which costs as much as the product itself on a CPU. With ``out`` it
    computes ``out + α · back(Y)`` in place."""
    a, b = (y.T, P.T) if transposed else (P, y)
    return torch.mm(a, b) if out is None else out.addmm_(a, b, alpha=alpha)


def orthogonal_residual(x: Tensor, P: Tensor, r: Tensor, n: Tensor, transposed: bool = False) -> Tensor:
    """Fira-style residual: what the subspace drops, scaled like the Adam update.

    ``φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + δ)`` per column j, and
    ``S = (X - P R) · diag(φ)``. (Fira subtracts ``α·P R``; we take the exact
    orthogonal residual, so ``Pᵀ S = 0``: our choice.)
    Returned in the parameter's layout (``Sᵀ`` when ``transposed``).

    The guard δ only keeps φ finite where a column of R vanishes. Fira's is
    the constant 1e-8, which makes S depend on the gradient's scale (at
    gradients of 2^-40 it is most of the denominator). Ours is relative:
    ``δ = 1e-8 · ‖X‖_F / sqrt(l)``, 1e-8 of X's RMS column norm, so scaling
    X by c leaves S unchanged (N is scale-free, eps aside); φ = 0 when X = 0.
    """
    guard = torch.linalg.vector_norm(x) * (1e-8 / math.sqrt(max(x.shape[1], 1)))  # δ
    denom = torch.linalg.vector_norm(r, dim=0) + guard  # (l,)
    phi = torch.where(denom > 0, torch.linalg.vector_norm(n, dim=0) / denom, 0.0)  # (l,)
    if transposed:
        return torch.addmm(x.T, r.T, P.T, alpha=-1).mul_(phi[:, None])  # Sᵀ: (l, s)
    return torch.addmm(x, P, r, alpha=-1).mul_(phi)  # S: (s, l)


def transform_moments(P_new: Tensor, P_old: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Carry Adam's moments from basis P_old (s×r_old) into P_new (s×r_new).

    ``C = P_newᵀ P_old`` (r_new×r_old); ``m ← C m``; ``v ← (C∘C) v``. The
    second rule (elementwise square, then a product) is our reading: it is
    the one that fits the shapes when the ranks differ and keeps ``v >= 0``.
    """
    C = P_new.T @ P_old
    return C @ exp_avg, (C * C) @ exp_avg_sq


def apply_update_(param: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """W <- W (1 - lr·wd) - lr·D, with D in the parameter's layout.

    D is a temporary of the step and is consumed: it is scaled in place by
    -lr (in its own dtype, float32 or better) and then added. Never written
    as ``param.add_(D, alpha=-lr)``: when D comes from a matrix product,
    torch.compile (inductor, torch 2.13) fuses ``add(W, mm(a, b), alpha)``
    into one kernel that drops ``alpha``, and the compiled step came out
    about 100 times too large. A multiply and a plain add compile correctly.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    update = update.mul_(-lr)
    param.add_(update if update.dtype == param.dtype else update.to(param.dtype))


# =============================================================================
# 2. Validation and the shared Optimizer base
# =============================================================================


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; raised before anything is modified."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_dtensor(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor: a weight sharded by FSDP2 (``fully_shard``)."""
    return hasattr(p, "device_mesh") and hasattr(p, "placements")


def _refuse_flattened(p: Tensor) -> None:
    """Refuse a parameter that FSDP1 (``FullyShardedDataParallel``) manages.

    FSDP1 flattens parameters into 1-D shards (``use_orig_params=True`` keeps
    the parameter objects but makes them 1-D views): a weight matrix is then
    no matrix, and a low-rank method would silently run as AdamW. FSDP1 marks
    every parameter it flattens with ``_fsdp_flattened``.
    """
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"a parameter (now of shape {tuple(p.shape)}) is managed by FullyShardedDataParallel (FSDP1), which "
            "flattens weight matrices into 1-D shards: the low-rank optimizers of lowrank_adam need each matrix "
            "whole. Use DistributedDataParallel, or ZeroRedundancyOptimizer (ZeRO-1) to shard the optimizer state")


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


def _validate_refresh(group: dict) -> None:
    """Checks of the refresh options of GaLoreAdamW and AdaptiveAdamW."""
    _check(group["refresh"] in ("svd", "randomized"),
           f"Invalid refresh: {group['refresh']!r} (expected 'svd' or 'randomized')")
    iters = group["refresh_iters"]
    _check(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1,
           f"Invalid refresh_iters: {iters!r} (an integer >= 1)")


class _Base(Optimizer):
    """Machinery every optimizer here shares: input checks before touching
    anything, param-group dicts copied (never mutated), options of another
    optimizer refused, and state restored exactly by ``load_state_dict``."""

    # Group options this optimizer honours besides its ``defaults`` (GaLore's
    # ``rank`` for the projected methods). Any other key in a group is refused
    # rather than silently ignored (a misspelt ``rnk``, another optimizer's
    # option), except torch's bookkeeping: ``params``, ``param_names`` (named
    # parameters), ``differentiable`` (which torch's own load_state_dict adds
    # to the defaults) and the keys torch's LR schedulers write into every
    # group (``initial_lr``; OneCycleLR and CyclicLR also ``max_lr``, ``min_lr``,
    # ``max_momentum`` and ``base_momentum``).
    group_keys: tuple[str, ...] = ()
    _fsdp2_step: Optional[Callable] = None  # step() of DTensor parameters; set by section 7 (``fsdp2_step``)
    _bookkeeping_keys = ("params", "param_names", "differentiable",
                         "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
    _refused_hints: dict[str, str] = {}

    def add_param_group(self, param_group: dict) -> None:
        # A copy: torch writes the defaults into the dict it is given, so a
        # list of groups reused for a second optimizer would silently inherit
        # the first one's options. ``params`` may be a tensor, a list, a
        # generator (consumed once, here) or (name, tensor) pairs.
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be an ordered collection (a list), not a set")
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        for p in tensors:
            if isinstance(p, Tensor):
                _check(not torch.is_complex(p), f"Complex parameters are not supported (shape {tuple(p.shape)})")
                _refuse_flattened(p)
        self._refuse_unknown_options(param_group)
        # Validate the group as it will be (defaults filled in) before torch
        # registers it, so a bad group never half-joins the optimizer.
        self._validate_group({**self.defaults, **param_group, "params": tensors})
        super().add_param_group(param_group)
        self.__dict__.pop("_where", None)  # step_parameter's lookup table is stale

    def _options(self) -> set[str]:
        return set(self.defaults) | set(self.group_keys)

    def _refuse_unknown_options(self, group: dict) -> None:
        for key in group:
            if key not in self._options() and key not in self._bookkeeping_keys:
                owners = _optimizers_with_option(key)
                hint = self._refused_hints.get(key, "remove it from the group")
                raise ValueError(f"{type(self).__name__} has no group option {key!r} "
                                 f"({'an option of ' + ', '.join(owners) if owners else 'unknown'}): {hint}. "
                                 f"Its group options: {', '.join(sorted(self._options()))}")

    def _validate_group(self, group: dict) -> None:  # overridden per optimizer
        _validate_adam(group)

    # -- the step: step() for every parameter, step_parameter(p) for one ----
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = self._closure(closure)
        items = [(p, g, i) for i, (p, g) in enumerate((p, g) for g in self.param_groups for p in g["params"])
                 if p.grad is not None]
        if any(_is_dtensor(p) for p, _, _ in items):  # FSDP2's sharded weights: section 7's owner-rank layer
            _check(self._fsdp2_step is not None, "FSDP2 (DTensor) parameters need section 7 of lowrank_adam")
            self._fsdp2_step(items)
            return loss
        self._check_grads(items)
        if items:
            self._step_items(items)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: Tensor) -> None:
        """Update the one parameter ``p`` now, exactly as ``step()`` would.

        For layer-wise training (GaLore's trick): call it from ``p``'s
        post-accumulate-grad hook and free ``p.grad`` right after, so the
        gradients of the whole model never exist at once (``layerwise_hooks``
        sets this up). The state dict is the ordinary one, so checkpoints
        and LR schedulers work unchanged (the hooks of
        ``register_step_pre_hook`` / ``_post_hook`` are not called). Costs one
        host sync per parameter for the NaN/Inf check (``check_finite=False``
        avoids it) and, for Adapprox, one for the parameter's next rank.
        """
        where = self.__dict__.get("_where")
        if where is None or len(where) != sum(len(g["params"]) for g in self.param_groups):
            where = self.__dict__["_where"] = {id(q): (gi, i) for i, (gi, q) in enumerate(
                (gi, q) for gi, g in enumerate(self.param_groups) for q in g["params"])}
        if id(p) not in where:
            raise ValueError(f"step_parameter: the tensor of shape {tuple(p.shape)} is not a parameter of this "
                             "optimizer")
        gi, index = where[id(p)]
        group = self.param_groups[gi]
        self._opt_called = True  # what torch's step wrapper records: LR schedulers then know a step happened
        self._check_layerwise(group)
        if p.grad is None:
            return
        if _is_dtensor(p):  # FSDP2: a collective step of this one parameter (section 7), called on every rank
            _check(self._fsdp2_step is not None, "FSDP2 (DTensor) parameters need section 7 of lowrank_adam")
            self._fsdp2_step([(p, group, index)])
            return
        self._check_grads([(p, group, index)])
        self._step_items([(p, group, index)])

    def _check_layerwise(self, group: dict) -> None:  # overridden where a step needs every parameter
        pass

    def _check_state(self, p: Tensor, group: dict) -> None:
        """Refuse a group whose ``rank`` went from an integer to None, or back,
        after its parameters took steps: their state (a basis and projected
        moments, or AdamW's full moments) is of the other kind."""
        state = self.state.get(p, {})
        if ("P" in state or "exp_avg" in state) and ("P" in state) != (group.get("rank") is not None):
            was, now = ("an integer", "None") if "P" in state else ("None", group.get("rank"))
            raise ValueError(f"{type(self).__name__}: the rank of the group of a parameter of shape "
                             f"{tuple(p.shape)} changed from {was} to {now} after it took steps; its state cannot "
                             "be carried over (nothing was changed). Set the rank back, or give the parameter to a "
                             "new optimizer")

    def _step_items(self, items: list[tuple[Tensor, dict, int]]) -> None:
        """Update the given (parameter, group, index) triples (all with grads)."""
        raise NotImplementedError

    @torch.no_grad()
    def _check_grads(self, items: list[tuple[Tensor, dict, int]]) -> None:
        """Raise, before any state or parameter changes, on a sparse, complex
        or non-finite gradient. Costs one host sync per device and call (not
        per tensor)."""
        checked = []
        for p, group, _ in items:
            _refuse_flattened(p)  # wrapped by FSDP1 after the optimizer was built
            self._check_state(p, group)
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(parameter of shape {tuple(p.shape)})")
            if torch.is_complex(p.grad):
                raise RuntimeError(f"{type(self).__name__} does not support complex gradients "
                                   f"(parameter of shape {tuple(p.shape)})")
            if group["check_finite"]:
                checked.append(p)
        if not checked:
            return
        # Σ g is NaN/Inf when g holds a NaN or Inf (a cheap reduction, 10× faster
        # than max|g| on CPU); stack the sums per device and sync once.
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in checked:
            by_device.setdefault(p.grad.device, []).append(p.grad.sum(dtype=torch.float32))
        if all_finite([torch.stack(v) for v in by_device.values()]):
            return
        for p in checked:  # slow path: name the culprit
            if not bool(torch.isfinite(p.grad).all()):
                step = self.state[p].get("step", 0) + 1 if p in self.state else 1
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient (NaN or Inf) for the parameter of shape "
                    f"{tuple(p.shape)} at its step {step}; this call updated nothing. "
                    "Lower the learning rate, clip gradients, or use a GradScaler for fp16.")
        # no culprit: a sum of huge finite values overflowed; the gradients are finite

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, then every floating state tensor is
        put back with the exact value and dtype it was saved with.

        torch casts floating state to the parameter's dtype while loading: for
        a bf16/fp16 model that rounds the float32 moments and bases (fp16 even
        flushes a small ``exp_avg_sq`` to zero), and restoring only the dtype
        afterwards cannot undo the rounding. Like torch, tensors already on
        the parameter's device are used as they are, not copied.
        """
        if "extra" in state_dict:  # written before the randomness became counter-based
            warnings.warn(f"{type(self).__name__}.load_state_dict: this state dict has the generator states of an "
                          "older version, which are ignored: the random sketches continue from counter-based "
                          "seeds, so the run does not continue bit-exactly", stacklevel=2)
        # Refuse the state dict of another optimizer now, not with a KeyError
        # inside a later step: its param groups hold options this one lacks.
        saved_keys = {k for g in state_dict["param_groups"] for k in g}
        foreign = saved_keys - self._options() - set(self._bookkeeping_keys)
        if foreign:
            writers = [name for name, options in _optimizer_options().items() if foreign <= options]
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state dict was written by "
                f"{' or '.join(writers) if writers else 'another optimizer'} (its param groups hold "
                f"{', '.join(sorted(foreign))}, which {type(self).__name__} does not have); nothing was loaded")
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # an option added since the state dict was written: its default
            for key, value in self.defaults.items():
                if key not in self._bookkeeping_keys:
                    group.setdefault(key, value)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    # contiguous, as the step keeps it: a column-major copy would round differently
                    self.state[p][name] = value.to(device=p.device).contiguous()

    def ranks(self) -> list[int]:
        """Current rank of each low-rank parameter, in param-group order."""
        return [self.ranks_of(p, g) for g in self.param_groups if g.get("rank") is not None for p in g["params"]]

    def _initial_rank(self, p: Tensor, group: dict) -> int:
        return min(group["rank"], min(p.shape))

    def ranks_of(self, p: Tensor, group: dict) -> int:
        """Current rank of the low-rank parameter ``p`` of ``group``."""
        st = self.state.get(p, {})
        return st["rank"] if "rank" in st else self._initial_rank(p, group)

    def _clamped_rank(self, p: Tensor, group: dict) -> int:
        """The group's rank, clamped to min(m, n) with one warning per optimizer."""
        rank = group["rank"]
        if rank > min(p.shape) and not getattr(self, "_warned_clamp", False):
            self._warned_clamp = True
            warnings.warn(f"{type(self).__name__}: rank {rank} exceeds min(m, n) = {min(p.shape)} of a "
                          f"parameter of shape {tuple(p.shape)}; using rank {min(p.shape)} for such matrices "
                          "(warned once).", stacklevel=3)
        return min(rank, min(p.shape))

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """A generator on ``device`` seeded with ``seed`` (see ``stream_seed``).
        One per device, kept only as a workspace: it is re-seeded before every
        draw, so it holds no state that a checkpoint would need."""
        cache = self.__dict__.setdefault("_generators", {})
        if device not in cache:
            cache[device] = torch.Generator(device=device)
        return cache[device].manual_seed(seed)

    def _dense_step(self, params: list[Tensor], group: dict) -> None:
        """The torch.optim.AdamW update for the parameters of a group without
        ``rank``: multi-tensor kernels, one call per device."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                dtype = linalg_dtype(p.dtype)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype)  # m: first moment
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)  # v: second moment
            state["step"] += 1
            by_device.setdefault(p.device, []).append(p)
        beta1, beta2 = group["betas"]
        for ps in by_device.values():
            states = [self.state[p] for p in ps]
            adamw_foreach_(ps, [p.grad for p in ps], [st["exp_avg"] for st in states],
                           [st["exp_avg_sq"] for st in states], [st["step"] for st in states], lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _update_each(self, items: list[tuple[Tensor, dict, int]],
                     lowrank_step: Callable[[Tensor, dict, int], None]) -> None:
        """Plain AdamW for groups without ``rank`` (one multi-tensor call per
        group), ``lowrank_step(p, group, index)`` for the others."""
        dense: dict[int, tuple[dict, list[Tensor]]] = {}
        for p, group, index in items:
            if group.get("rank") is None:
                dense.setdefault(id(group), (group, []))[1].append(p)
            else:
                lowrank_step(p, group, index)
        for group, params in dense.values():
            self._dense_step(params, group)

    def _closure(self, closure: Optional[Callable[[], float]]):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def _optimizer_options() -> dict[str, set[str]]:
    """The group options of every optimizer class defined (looked up when
    needed, so that a class copied out alone still works): name -> options."""
    out, todo = {}, list(_Base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        out[cls.__name__] = {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")}
        out[cls.__name__] |= set(cls.group_keys)
    return out


def _optimizers_with_option(key: str) -> list[str]:
    return sorted(name for name, options in _optimizer_options().items() if key in options)


# =============================================================================
# 3. GaLoreAdamW: uniform-rank gradient projection (the baseline)
# =============================================================================


SUBSPACES = ("svd", "random", "gha")


def random_basis(s: int, r: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A uniformly distributed r-dimensional subspace of R^s: the orthonormal
    factor of an s×r standard Gaussian matrix (signs fixed, so the basis
    itself is Haar-distributed). Drawn on the generator's device."""
    return orthonormalize_signed(torch.randn(s, r, generator=generator, device=generator.device, dtype=dtype))


def gha_step(P: Tensor, x: Tensor, r: Tensor, lr: float) -> Tensor:
    """One step of Sanger's rule (the Generalized Hebbian Algorithm) towards
    the top-r eigenvectors of ``C = X Xᵀ / ‖X‖²_F``::

        P ← P + η (C P - P triu(Pᵀ C P))

    ``r = Pᵀ X`` is the projected gradient the optimizer computed anyway, so
    ``C P = X rᵀ / ‖X‖²`` and ``Pᵀ C P = r rᵀ / ‖X‖²``: one s·l·r product.
    Dividing by ``‖X‖²_F`` (the trace of X Xᵀ, so C's eigenvalues lie in
    [0, 1]) makes the step size independent of the gradient's scale (our
    normalization). A zero gradient leaves P unchanged.
    """
    energy = torch.linalg.vector_norm(x).square().clamp_min(1e-30)
    cp = (r @ x.T).T  # X rᵀ = X Xᵀ P: (s, r), written with X on the right (fast skinny product)
    return P + (cp - P @ torch.triu(r @ r.T)) * (lr / energy)


class GaLoreAdamW(_Base):
    r"""AdamW with GaLore gradient low-rank projection (Zhao et al. 2024).

    For each parameter in a group with a ``rank`` key, with the gradient in
    oriented form X (s×l, s = min(m, n); see the module docstring)::

        if t ≡ 1 (mod T):  P ← top-r left singular vectors of X   (SVD, float32)
        R ← Pᵀ X                                   (r×l projected gradient)
        m ← β1 m + (1-β1) R ;  v ← β2 v + (1-β2) R²
        N ← m̂ / (sqrt(v̂) + ε)                      (Adam in the subspace)
        W ← W (1 - lr·wd) - lr · α · P N           (project back, scale α)

    Moments are left as they are when P changes (GaLore's behaviour), so each
    new column of P takes the sign that agrees with the old basis
    (``align_signs_``; galore-torch keeps LAPACK's signs, which differ
    between dtypes and devices). A refresh that meets an all-zero gradient
    keeps P and is done again at the next step. A group's ``rank`` changed
    between steps takes effect at the next refresh (the moments keep their
    first min(r_old, r) rows); a change between an integer and None is
    refused. Every other parameter gets plain AdamW. Param groups follow
    galore-torch::

        groups = lowrank_groups(model, rank=128, update_proj_gap=200, scale=0.25)
        opt = GaLoreAdamW(groups, lr=1e-2)      # GaLore uses a high lr

    Group options: ``rank`` (int), ``update_proj_gap`` T (200), ``scale`` α
    (0.25), ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``),
    ``residual`` (False): add the Fira-style out-of-subspace residual
    ``S`` (see ``orthogonal_residual``), whose RMS may grow by at most
    ``norm_growth_limit`` γ (1.01) per step; the update is then
    ``α·P N + S``. GaLore itself has no limiter: γ only acts on ``S``.

    ``refresh`` chooses how the SVD subspace is computed at steps T+1,
    2T+1, ...: ``"svd"``, the exact thin SVD (GaLore), or ``"randomized"``,
    a range finder warm-started from the previous P plus
    ``REFRESH_OVERSAMPLE`` Gaussian columns, ``refresh_iters`` (1) subspace
    iterations and a small SVD (``randomized_spectrum``). The previous basis
    is an excellent start, since the gradient's leading subspace drifts
    slowly, so one iteration captures nearly all the energy the exact SVD
    would, at a fraction of the cost: no refresh spike. The new columns take
    the signs of the old ones, so the moments GaLore leaves in place keep
    their direction. Step 1 has no previous basis: it is an exact SVD.
    The random columns come from ``stream_seed(seed, i, t)``, as below.

    ``stagger`` (False): spread the refreshes over the gap instead of doing
    them all at once. Matrix i (its parameter index) refreshes at steps
    t ≡ 1 + (i mod T) (mod T) after its first basis at step 1, still once
    every T steps, so a step refreshes about 1/T of the matrices and no
    step is a stall (``refresh_due``). Off by default: GaLore's schedule.

    ``subspace`` chooses how P is found (the AdaptiveAdamW repository's
    baselines ``rsadamw`` and ``gha``, whose code is not public: these are
    our readings of their names)::

        "svd"     GaLore: the SVD above at every refresh, moments untouched
        "random"  at every refresh a fresh uniformly random P (``random_basis``,
                  from ``stream_seed(seed, i, t)``: the same on every rank);
                  the moments follow it: C = P_newᵀ P_old, m ← C m, v ← (C∘C) v
                  (our reading of "random subspace drift": the subspace
                  moves, the statistics go with it)
        "gha"     P from the SVD at step 1, then tracked every step by
                  Sanger's rule (``gha_step``, step size ``gha_lr``) on the
                  gradient the step just used, re-orthonormalized (QR) each
                  step; at every refresh the moments follow P from where it
                  was at the previous refresh (``P_ref``, as above). No SVD
                  after step 1; one more s·l·r product per step than GaLore.

    GHA choices, made by measurement (figures in docs/RESULTS.md): Sanger's
    rule alone lets the basis drift away from orthonormal until training
    diverges, hence the QR every step; moments that follow P only at the
    refreshes trained better than moments that follow it every step; and
    ``gha_lr`` 0.5 is as good as 1 and better than 0.1.

    Not for: 1-D tensors, embeddings or small matrices (they gain nothing).
    Memory per low-rank matrix: ``2·r·l + s·r`` floats instead of ``2·m·n``
    (``gha``: ``2·r·l + 2·s·r``, for ``P_ref``).
    """

    group_keys = ("rank",)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", residual: bool = False, norm_growth_limit: Optional[float] = 1.01,
                 subspace: str = "svd", refresh: str = "svd", refresh_iters: int = 1, gha_lr: float = 0.5,
                 stagger: bool = False, seed: int = 0, check_finite: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale, proj_type=proj_type, residual=residual, norm_growth_limit=norm_growth_limit,
                        subspace=subspace, refresh=refresh, refresh_iters=refresh_iters, gha_lr=gha_lr,
                        stagger=stagger, seed=seed, check_finite=check_finite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        if group.get("rank") is not None:
            _validate_rank(group, PROJ_TYPES)
            _check(group["scale"] > 0, f"Invalid scale: {group['scale']}")
            gamma = group["norm_growth_limit"]
            _check(gamma is None or gamma >= 1.0, f"Invalid norm_growth_limit: {gamma} (use >= 1, or None for off)")
        _check(group["subspace"] in SUBSPACES, f"Invalid subspace: {group['subspace']!r} (expected one of {SUBSPACES})")
        _validate_refresh(group)
        if group["subspace"] == "gha":
            _check(0.0 < group["gha_lr"] <= 1.0, f"Invalid gha_lr: {group['gha_lr']} (use 0 < gha_lr <= 1)")
        _check(isinstance(group["seed"], int) and not isinstance(group["seed"], bool), f"Invalid seed: {group['seed']!r}")
        _check(isinstance(group["stagger"], bool), f"Invalid stagger: {group['stagger']!r} (True or False)")

    def _step_items(self, items: list[tuple[Tensor, dict, int]]) -> None:
        self._update_each(items, self._galore_step)

    def _galore_step(self, p: Tensor, group: dict, index: int) -> None:
        """One GaLore step of one matrix: the algorithm box above, line by line."""
        state = self.state[p]
        transposed = is_transposed(p.shape, group["proj_type"])
        X = oriented_grad(p, transposed)  # X: (s, l)
        t = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        subspace, gamma = group["subspace"], group["norm_growth_limit"]

        # -- at t = 1, T+1, 2T+1, ... (stagger: t = 1, then t ≡ 1 + offset mod T): a new basis P (s×r)
        if refresh_due(t, index, group) or state.get("refresh_again"):
            P_new = self._new_basis(p, X, state, group, index, t)
            if P_new is not None:  # (None: an all-zero X, P kept until the next step)
                if "exp_avg" in state and subspace != "svd":
                    # the moments follow the basis: C = P_newᵀ P_old ;  M ← C M ;  V ← (C∘C) V
                    # (GHA: P_old is P at the last refresh, the basis the moments are in)
                    P_old = state.get("P_ref", state["P"]) if subspace == "gha" else state["P"]
                    state["exp_avg"], state["exp_avg_sq"] = transform_moments(P_new, P_old, state["exp_avg"],
                                                                              state["exp_avg_sq"])
                elif "exp_avg" in state and P_new.shape[1] != state["exp_avg"].shape[0]:
                    # the group's rank changed: the moments stay in place, their first min(r_old, r) rows kept
                    state["exp_avg"] = resize_rows(state["exp_avg"], P_new.shape[1])
                    state["exp_avg_sq"] = resize_rows(state["exp_avg_sq"], P_new.shape[1])
                state["P"], state["rank"] = P_new, P_new.shape[1]
                if subspace == "gha":
                    state["P_ref"] = P_new
                else:
                    state.pop("P_ref", None)  # left over if the group's subspace was "gha" until now

        # -- every step: Adam in the subspace, projected back ----------------
        P = state["P"]
        if "exp_avg" not in state:
            state["exp_avg"] = X.new_zeros(P.shape[1], X.shape[1])  # M: (r, l)
            state["exp_avg_sq"] = X.new_zeros(P.shape[1], X.shape[1])  # V: (r, l)
        # R ← Pᵀ X
        R = P.T @ X
        # M, V ← Adam moments of R ;  N ← M̂ / (sqrt(V̂) + ε)
        N = adam_normalized_(state["exp_avg"], state["exp_avg_sq"], R, t, beta1, beta2, group["eps"])
        if group["residual"]:
            # (Fira) S ← (X - P R) diag(φ), its RMS growth capped at γ per step ;  D ← α P N + S
            if "rms" not in state:  # RMS of the last S (0 = no history, also when switched on between steps)
                state["rms"] = X.new_zeros(())
            S = orthogonal_residual(X, P, R, N, transposed)
            if gamma is not None:
                state["rms"] = norm_growth_limit_(S, state["rms"], gamma)
            D = back_project(P, N, transposed, out=S, alpha=group["scale"])
        else:
            # D ← α P N
            D = back_project(P, N.mul_(group["scale"]), transposed)
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, D, group["lr"], group["weight_decay"])
        state["step"] = t
        if subspace == "gha":
            # P ← orth(P + η (C P - P triu(Pᵀ C P))), C = X Xᵀ/‖X‖²   (for the next step)
            state["P"] = orthonormalize_signed(gha_step(P, X, R, group["gha_lr"]))

    def _new_basis(self, p: Tensor, X: Tensor, state: dict, group: dict, index: int, t: int) -> Optional[Tensor]:
        """P_new (s×r) at a refresh, as the group's ``subspace`` and ``refresh``
        say; r is the group's rank (clamped), so a changed rank takes effect
        here. Returns None to keep P: an all-zero X has no subspace to give."""
        subspace, r = group["subspace"], self._clamped_rank(p, group)
        # 1: the last refresh met an all-zero X, so this one is its retry (a number that every state holds,
        # 0 or 1, so that a state created by torch's zero-gradient step has the keys of a trained one)
        retry, state["refresh_again"] = state.get("refresh_again", 0), 0
        if group["refresh"] == "randomized":  # from the first refresh (an SVD) on: a resume by name keeps the stream
            state.setdefault("seed", stream_seed(group["seed"], index))
        if subspace == "random":
            # P ← orth(Ω), Ω ~ N(0, 1) of shape s×r, drawn from stream_seed(seed of this parameter, t)
            state.setdefault("seed", stream_seed(group["seed"], index))
            rng = self._generator(p.device, stream_seed(state["seed"], t))
            return random_basis(X.shape[0], r, rng, X.dtype)
        if subspace == "gha" and "P" in state and not retry and state["P"].shape[1] == r:
            # P: where Sanger's rule has taken it since the last refresh
            return state["P"]
        # The other bases are read off X. An all-zero X (torch's checkpoint helpers step once with zero
        # gradients to create the state) has none: P is kept (coordinate axes if there is none yet) and
        # the refresh is tried again at the next step, so a zero gradient never fixes P for T steps.
        # One host sync per matrix and refresh, where the SVD synchronizes anyway (none with
        # check_finite=False, which promises a step without host syncs).
        if group["check_finite"] and is_all_zero(X):
            state["refresh_again"] = 1
            return None if "P" in state else torch.eye(X.shape[0], r, dtype=X.dtype, device=X.device)
        if group["refresh"] == "randomized" and "P" in state:
            # P ← top-r of a randomized range finder warm-started from P_prev (``randomized_spectrum``)
            rng = self._generator(p.device, stream_seed(state["seed"], t))
            U, _ = randomized_spectrum(X, r + REFRESH_OVERSAMPLE, state["P"], rng, group["refresh_iters"])
            return U[:, :r].contiguous()
        # P ← top-r left singular vectors of X (GaLore; GHA's start), signed like P_prev (``align_signs_``)
        P_new = top_r_basis(X, r)
        return align_signs_(P_new, state["P"]) if "P" in state else P_new


# =============================================================================
# 4. AdaptiveAdamW: a global rank budget split by gradient spectra
# =============================================================================


def _ratio(a: float, b: float) -> float:
    """a / b, and 0 when b is 0 (a zero-gradient matrix scores 0, never NaN)."""
    return a / b if b > 0 else 0.0


# Score of giving a matrix rank r+1, from its singular values s (descending,
# 0-indexed: s[r] is the (r+1)-th value), at its current rank r >= 1, where
# E = Σ sᵢ² is the gradient's energy. The greedy allocator gives the next unit
# of budget to the highest score.
RANK_METRICS: dict[str, Callable[[list[float], int, float], float]] = {
    # s_{r+1}² / E: the share of the gradient's energy the next direction explains
    "explained_variance": lambda s, r, E: _ratio(s[r] ** 2, E),
    # s_{r+1}²: raw energy, favours matrices with large gradients
    "singular_value": lambda s, r, E: s[r] ** 2,
    # s_{r+1} / s_1: the next value relative to the largest
    "conditioning": lambda s, r, E: _ratio(s[r], s[0]),
    # s_{r+1} / s_r: the next value relative to the last one kept
    "gap": lambda s, r, E: _ratio(s[r], s[r - 1]),
    # w·s_{r+1}²/E + (1-w)·s_{r+1}/s_1 with w = 0.5
    "combined": lambda s, r, E: 0.5 * _ratio(s[r] ** 2, E) + 0.5 * _ratio(s[r], s[0]),
    # -(Σ_{i<=r} sᵢ²)/E: helps the matrix that captures the least variance now
    "uniform_variance": lambda s, r, E: -_ratio(sum(v * v for v in s[:r]), E),
}


@torch.compiler.disable  # plain Python on host numbers: nothing for torch.compile to trace
def allocate_ranks(spectra: Sequence[Sequence[float]], budget: int, caps: Optional[Sequence[int]] = None,
                   metric: str = "explained_variance", energies: Optional[Sequence[float]] = None) -> list[int]:
    """Greedy rank allocation: spectra + budget + caps -> one rank per matrix.

    Every matrix starts at rank 1; while budget is left, the matrix whose next
    singular value scores highest under ``metric`` gets one more rank. A
    matrix never exceeds its cap (default: its number of singular values);
    the budget is capped at the sum of the caps; ties go to the lower index.
    O(B log L) with a heap.
    """
    if metric not in RANK_METRICS:
        raise ValueError(f"Invalid rank metric: {metric!r} (expected one of {sorted(RANK_METRICS)})")
    score = RANK_METRICS[metric]
    spectra = [[float(v) for v in s] for s in spectra]
    caps = [len(s) for s in spectra] if caps is None else [min(int(c), len(s)) for c, s in zip(caps, spectra)]
    if any(c < 1 for c in caps):
        raise ValueError("every matrix needs at least one singular value")
    # E = Σ sᵢ² = ‖X‖²_F; pass it when the spectra are truncated (a randomized refresh)
    energy = [sum(v * v for v in s) for s in spectra] if energies is None else [float(e) for e in energies]
    ranks = [1] * len(spectra)
    budget = min(budget, sum(caps))
    # heap of (-score of the next rank, matrix index): pops the best, lower index on ties
    heap = [(-score(s, 1, e), i) for i, (s, e, c) in enumerate(zip(spectra, energy, caps)) if c > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(spectra)):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-score(spectra[i], ranks[i], energy[i]), i))
    return ranks


class AdaptiveAdamW(_Base):
    r"""GaLore with a global rank budget allocated from gradient spectra.

    The ``rank`` of each low-rank group is the *average* rank per matrix; the
    budget is ``B = Σ rank`` over all its matrices (read at each refresh, so
    a changed group rank takes effect there). On steps 1, T+1, 2T+1, …
    (T = ``update_proj_gap``), for the matrices refreshed together (a matrix
    whose gradient is all-zero then keeps P and its rank, and is refreshed at
    the next step from the budget the others leave)::

        X_i = U_i diag(s_i) V_iᵀ           one thin SVD per matrix (float32)
        r_i ← allocate_ranks(s, B, caps)    greedy: rank 1 each, then the best
                                            next singular value by `rank_metric`
        P_i ← U_i[:, :r_i]
        C_i = P_newᵀ P_old ; m ← C m ; v ← (C∘C) v       momentum transformation

    and every step, as GaLore, plus the out-of-subspace residual S with a
    norm-growth limiter (``residual=True``, the default)::

        R ← Pᵀ X ;  m, v ← Adam moments of R ;  N ← m̂ / (sqrt(v̂) + ε)
        S ← (X - P R) · diag(φ),  φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + δ)      (δ: see orthogonal_residual)
        S ← S · min(1, γ·RMS_{t-1} / RMS(S))            (no limit at step 1)
        W ← W (1 - lr·wd) - lr · (α · P N + S)

    With ``residual=False`` there is no S and the limiter acts on N instead
    (``N ← N · min(1, γ·RMS_{t-1}/RMS(N))``, ``W ← W(1-lr·wd) - lr·α·P N``).
    RMS = ‖·‖_F / sqrt(numel), so a rank change alone does not trip the
    limiter. The source says only that the limiter caps "relative increases
    in normalized gradient norm"; Fira (Chen et al. 2024, arXiv:2410.01623)
    applies it to S. We measured both readings, with the learning rate
    swept for each (docs/RESULTS.md): with the residual the loss is clearly
    lower at every rank tried, and below AdamW's, so the residual is the
    default. It costs one full-size temporary per matrix and no extra state.

    Group options as GaLoreAdamW (but no ``subspace``: the allocation needs
    singular values), including ``refresh``, plus ``rank_metric`` (one of ``RANK_METRICS``, default
    ``explained_variance``; the same in every group that allocates),
    ``transform_momentum`` (True) and ``norm_growth_limit`` γ (1.01, None =
    off). ``stagger`` (False) spreads the refreshes over the gap as in
    GaLoreAdamW (``refresh_due``); the allocation stays global: the matrices
    not due take part with the spectrum of their own last refresh (kept in
    the state: min(m, n) singular values, or the leading ones a randomized
    refresh finds, and the energy ‖X‖²_F), the budget is all of
    B; one allocated less than it holds drops its last directions (columns
    of P and rows of the moments) at once, one allocated more grows at its
    own refresh, which needs its SVD. So the ranks held never exceed B, and
    fall short of it for part of a gap (measured in docs/RESULTS.md, with
    its loss). Every step then allocates, so it costs one host sync a step.
    ``allocate=False`` keeps the matrices of a group at its rank, out
    of the shared budget (then, with the transformation and limiter off,
    this is exactly GaLoreAdamW). ``refresh_keep`` (2.0) bounds the memory
    of a refresh: of each matrix's singular vectors, at most ⌈refresh_keep ×
    the group's rank⌉ (and at least the matrix's current rank) are held
    until the allocation is known (a matrix allocated more gets its SVD
    recomputed, which gives the same vectors); None keeps them all.
    With ``refresh="randomized"`` (after step 1) a matrix's spectrum is
    approximated: only its leading ⌈refresh_keep × rank⌉ + oversample values
    are known (each a lower bound of the true value, from the range finder
    warm-started at its current basis), so no matrix can be allocated more;
    the scores divide by the exact energy ‖X‖²_F, not by the sum of the
    known values. Spectra are of the gradient handed to ``step``, i.e. already summed over
    the micro-batches of gradient accumulation (our reading of the source's
    "accumulated gradients"). ``ranks()`` gives the current allocation,
    which is part of the state dict, so a resumed run keeps it::

        opt = AdaptiveAdamW(lowrank_groups(model, rank=8, update_proj_gap=200), lr=1e-2)
    """

    group_keys = ("rank",)
    _refused_hints = {"subspace": "AdaptiveAdamW's allocation needs the spectra of the SVD, so its subspace is "
                                  "always the SVD's (use GaLoreAdamW for 'random' or 'gha')"}

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", rank_metric: str = "explained_variance", allocate: bool = True,
                 transform_momentum: bool = True, norm_growth_limit: Optional[float] = 1.01,
                 residual: bool = True, refresh_keep: Optional[float] = 2.0, refresh: str = "svd",
                 refresh_iters: int = 1, stagger: bool = False, seed: int = 0, check_finite: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale, proj_type=proj_type, residual=residual, norm_growth_limit=norm_growth_limit,
                        check_finite=check_finite, rank_metric=rank_metric, allocate=allocate,
                        transform_momentum=transform_momentum, refresh_keep=refresh_keep, refresh=refresh,
                        refresh_iters=refresh_iters, stagger=stagger, seed=seed)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        if group.get("rank") is not None:
            _validate_rank(group, PROJ_TYPES)
            _check(group["scale"] > 0, f"Invalid scale: {group['scale']}")
            gamma = group["norm_growth_limit"]
            _check(gamma is None or gamma >= 1.0, f"Invalid norm_growth_limit: {gamma} (use >= 1, or None for off)")
            _validate_refresh(group)
            _check(isinstance(group["seed"], int) and not isinstance(group["seed"], bool),
                   f"Invalid seed: {group['seed']!r}")
            _check(group["rank_metric"] in RANK_METRICS,
                   f"Invalid rank_metric: {group['rank_metric']!r} (expected one of {sorted(RANK_METRICS)})")
            keep = group["refresh_keep"]
            _check(keep is None or keep > 0, f"Invalid refresh_keep: {keep} (use > 0, or None to keep every vector)")
            # One greedy allocation compares the scores of all allocating
            # matrices, so they must all be scored by the same metric.
            others = {g["rank_metric"] for g in self.param_groups if g.get("rank") is not None and g["allocate"]}
            _check(not group["allocate"] or others <= {group["rank_metric"]},
                   f"Invalid rank_metric: {group['rank_metric']!r} differs from {sorted(others)} of another group; "
                   "every group that allocates shares one budget and must use the same rank_metric "
                   "(or set allocate=False in one of them)")
            _check(isinstance(group["stagger"], bool), f"Invalid stagger: {group['stagger']!r} (True or False)")
            staggers = {g["stagger"] for g in self.param_groups if g.get("rank") is not None and g["allocate"]}
            _check(not group["allocate"] or staggers <= {group["stagger"]},
                   f"Invalid stagger: {group['stagger']!r} differs from another group's; every group that allocates "
                   "shares one budget and one schedule (or set allocate=False in one of them)")

    def _step_items(self, items: list[tuple[Tensor, dict, int]]) -> None:
        # At t = 1, T+1, 2T+1, ...: new ranks and bases for the matrices due, together
        # (and again at the next step for a matrix whose gradient was all-zero at its refresh)
        due = [(p, g, i) for p, g, i in items if g.get("rank") is not None and (
            refresh_due(self.state[p].get("step", 0) + 1, i, g) or self.state[p].get("refresh_again"))]
        if due or self.__dict__.get("_peers"):  # under FSDP2 every rank takes part in the allocation
            self._allocate_and_refresh(due, items)
        # Every step: projected Adam with the residual (or the limiter on N)
        self._update_each(items, self._adaptive_step)

    def _allocate_and_refresh(self, due: list[tuple[Tensor, dict, int]], items: list[tuple[Tensor, dict, int]]
                              ) -> None:
        """The refresh half of the algorithm box, for all matrices due at once
        (``items``: every parameter of this step)."""
        # 0. E = ‖X‖²_F of each matrix (one host sync). An all-zero X (torch's checkpoint
        #    helpers step once with zero gradients to create the state) has no spectrum: the
        #    matrix keeps its P and rank (coordinate axes at first), stays out of the
        #    allocation, and is refreshed again at the next step (``refresh_again``: 0 or 1,
        #    in every state, so that a state created by that step has a trained one's keys).
        energies = [torch.linalg.vector_norm(p.grad, dtype=linalg_dtype(p.dtype)).square().reshape(1)
                    for p, _, _ in due]
        for (p, g, index), (e,) in zip(due, self._to_host(energies)):
            state = self.state[p]
            state["refresh_again"] = int(e == 0)
            if g["refresh"] == "randomized":  # from the first refresh (an SVD) on: a resume by name keeps the stream
                state.setdefault("seed", stream_seed(g["seed"], index))
            if e == 0:
                if "P" not in state:
                    state["rank"] = self._clamped_rank(p, g)
                    state["P"] = torch.eye(min(p.shape), state["rank"], dtype=linalg_dtype(p.dtype), device=p.device)
        energies = [e for e, (p, _, _) in zip(energies, due) if not self.state[p]["refresh_again"]]
        due = [(p, g, i) for p, g, i in due if not self.state[p]["refresh_again"]]
        # Ranks before this refresh: the allocation so far, or the group's rank
        # (clamped to min(m, n)) at the first refresh; a group with
        # ``allocate=False`` keeps its rank. The matrices of groups with
        # ``allocate=True`` hold B = Σ of their groups' ranks (each clamped to
        # min(m, n)) together: those refreshed now share what the others do not
        # hold (all of B when all refresh, as on the ordinary schedule), and a
        # group's rank changed between steps takes effect here.
        ranks = [self._clamped_rank(p, g) if "rank" not in self.state[p] or not g["allocate"]
                 else self.state[p]["rank"] for p, g, _ in due]
        pool = [i for i, (_, g, _) in enumerate(due) if g["allocate"]]
        held = [(p, g, i) for p, g, i in items if g.get("rank") is not None and g["allocate"]]
        # stagger: the matrices not due take part with the spectrum of their own last refresh
        # (state "spectrum", "energy"), so that the allocation stays global; one allocated less
        # than it holds drops its last directions at once, one allocated more grows at its own
        # refresh (new directions need its SVD): the ranks held never exceed B
        due_ids = {id(p) for p, _, _ in due}
        stored = [(p, g, i) for p, g, i in held if g["stagger"] and id(p) not in due_ids
                  and "spectrum" in self.state[p]]
        allocated_here = due_ids | {id(p) for p, _, _ in stored}
        budget = sum(self._clamped_rank(p, g) - (0 if id(p) in allocated_here else self.ranks_of(p, g))
                     for p, g, _ in held)
        # Under FSDP2 this rank steps only the matrices it owns, and ``_peers``
        # (section 7) sums B and L (and the matrices due) over every rank's.
        peers = self.__dict__.get("_peers")
        totals = [budget, len(pool) + len(stored), len(due)]
        budget, pooled, due_anywhere = peers.sum(totals) if peers else totals
        if not due_anywhere:
            return
        # 1. Spectra: X = U diag(s) Vᵀ, one thin SVD per matrix. Of U, keep only
        #    the columns an allocation is likely to use: at most B - (L - 1),
        #    and at most refresh_keep × the group's rank (so the refresh never
        #    holds every matrix's full s×s basis at once; our bound).
        #    refresh="randomized": only the leading keep + oversample vectors
        #    and values, from a range finder warm-started from P_prev (the first
        #    refresh, without a P_prev, is an exact SVD).
        keep = []
        for i, (_, g, _) in enumerate(due):
            if i not in pool:  # a fixed rank
                keep.append(ranks[i])
            elif g["refresh_keep"] is None:  # every vector an allocation could use
                keep.append(budget - pooled + 1)
            else:  # refresh_keep × the group's rank, and at least the current rank
                keep.append(min(budget - pooled + 1, max(ranks[i], math.ceil(g["refresh_keep"] * g["rank"]))))
        svds = []
        for (p, g, index), k in zip(due, keep):
            X = oriented_grad(p, is_transposed(p.shape, g["proj_type"]))
            state = self.state[p]
            if g["refresh"] == "randomized" and "P" in state:
                rng = self._generator(p.device, stream_seed(state["seed"], state["step"] + 1))
                svds.append(randomized_spectrum(X, k + REFRESH_OVERSAMPLE, state["P"], rng, g["refresh_iters"]))
            else:
                svds.append(gradient_spectrum(X, k))
        # 2. Greedy allocation: rank 1 each, then the best next singular value
        if pooled:
            if pool and due[pool[0]][1]["stagger"]:  # kept for the allocations until this matrix's next refresh
                for i in pool:
                    self.state[due[i][0]].update(spectrum=svds[i][1].clone(), energy=energies[i])
            spectra = [svds[i][1] for i in pool] + [self.state[p]["spectrum"] for p, _, _ in stored]
            energy_list = [energies[i] for i in pool] + [self.state[p]["energy"] for p, _, _ in stored]
            host = self._to_host(spectra + energy_list)  # one sync per device
            n = len(spectra)
            # (parameter index, spectrum, E, cap, metric) of each matrix; under FSDP2 every rank's, by index
            mine = [(i, host[k], host[n + k][0], min(p.shape), g["rank_metric"])
                    for k, (p, g, i) in enumerate([due[j] for j in pool] + stored)]
            every = peers.gather(mine) if peers else mine
            indices, spectra, energy, caps, metric = zip(*every)
            allocated = dict(zip(indices, allocate_ranks(spectra, budget, caps, metric[0], energy)))
            for i in pool:
                ranks[i] = allocated[due[i][2]]
            for p, _, i in stored:  # stagger: a matrix not due and allocated less drops its last directions now
                state, rank = self.state[p], allocated[i]
                if rank < state["rank"]:  # (P's columns are by singular value; the moments are rows in P)
                    state.update(P=state["P"][:, :rank].contiguous(), rank=rank,
                                 exp_avg=state["exp_avg"][:rank].contiguous(),
                                 exp_avg_sq=state["exp_avg_sq"][:rank].contiguous())
        for (p, group, _), (u, _), rank in zip(due, svds, ranks):
            state = self.state[p]
            # 3. P_new ← top-r_new left singular vectors (a matrix allocated more
            #    than was kept: its SVD again, which gives the same vectors)
            if rank <= u.shape[1]:
                P_new = u[:, :rank].contiguous()
            else:
                P_new = top_r_basis(oriented_grad(p, is_transposed(p.shape, group["proj_type"])), rank)
            if "P" in state:
                align_signs_(P_new, state["P"])  # each column signed like P_prev's (see ``align_signs_``)
            if "P" in state and "exp_avg" in state:
                if group["transform_momentum"]:
                    # 4. C = P_newᵀ P_old ;  m ← C m ;  v ← (C∘C) v
                    state["exp_avg"], state["exp_avg_sq"] = transform_moments(
                        P_new, state["P"], state["exp_avg"], state["exp_avg_sq"])
                elif rank != state["rank"]:
                    # no transformation: keep the first min(r_old, r_new) rows (GaLore-like)
                    state["exp_avg"] = resize_rows(state["exp_avg"], rank)
                    state["exp_avg_sq"] = resize_rows(state["exp_avg_sq"], rank)
            state["P"], state["rank"] = P_new, rank

    def _adaptive_step(self, p: Tensor, group: dict, index: int) -> None:
        """The every-step half of the algorithm box, for one matrix."""
        state = self.state[p]
        transposed = is_transposed(p.shape, group["proj_type"])
        X = oriented_grad(p, transposed)  # X: (s, l)
        P = state["P"]  # (s, r), r this matrix's allocated rank
        t = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        gamma = group["norm_growth_limit"]
        if "exp_avg" not in state:
            state["exp_avg"] = X.new_zeros(P.shape[1], X.shape[1])  # M: (r, l)
            state["exp_avg_sq"] = X.new_zeros(P.shape[1], X.shape[1])  # V: (r, l)
        if "rms" not in state:
            state["rms"] = X.new_zeros(())  # RMS of the last limited update (0 = no history)
        # R ← Pᵀ X
        R = P.T @ X
        # M, V ← Adam moments of R ;  N ← M̂ / (sqrt(V̂) + ε)
        N = adam_normalized_(state["exp_avg"], state["exp_avg_sq"], R, t, beta1, beta2, group["eps"])
        if group["residual"]:
            # S ← (X - P R) diag(φ) ;  S ← S · min(1, γ·RMS_{t-1}/RMS(S)) ;  D ← α P N + S
            S = orthogonal_residual(X, P, R, N, transposed)
            if gamma is not None:
                state["rms"] = norm_growth_limit_(S, state["rms"], gamma)
            D = back_project(P, N, transposed, out=S, alpha=group["scale"])
        else:
            # N ← N · min(1, γ·RMS_{t-1}/RMS(N)) ;  D ← α P N
            if gamma is not None:
                state["rms"] = norm_growth_limit_(N, state["rms"], gamma)
            D = back_project(P, N.mul_(group["scale"]), transposed)
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, D, group["lr"], group["weight_decay"])
        state["step"] = t

    def _check_layerwise(self, group: dict) -> None:
        if group.get("rank") is not None and group["allocate"]:
            raise RuntimeError("AdaptiveAdamW cannot update one parameter at a time (layer-wise): its allocation "
                               "splits one rank budget using the spectra of all matrices at once. Use "
                               "allocate=False (fixed ranks) or GaLoreAdamW for layer-wise updates.")

    @staticmethod
    @torch.compiler.disable  # a host sync: under torch.compile a quiet graph break, not a warning block
    def _to_host(tensors: list[Tensor]) -> list[list[float]]:
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        out: list[list[float]] = [[] for _ in tensors]
        for idx in by_device.values():
            flat = torch.cat([tensors[i] for i in idx]).tolist()
            for i in idx:
                out[i], flat = flat[: tensors[i].numel()], flat[tensors[i].numel():]
        return out


# =============================================================================
# 5. LDAdam: a new subspace every step, projection-aware moments, error feedback
# =============================================================================


def power_iteration_basis(a: Tensor, P_prev: Tensor, M: Tensor, coef_m: float, coef_a: float) -> Tensor:
    """One block power iteration warm-started from P_prev (PowerSGD-style).

    Target ``T = coef_m · P_prev M + coef_a · A`` (s×l); returns
    ``P = orth(T (Tᵀ P_prev))`` (s×r) without ever forming T: since P_prev
    has orthonormal columns, ``Tᵀ P_prev = coef_m · Mᵀ + coef_a · Aᵀ P_prev``
    and ``T Y = coef_m · P_prev (M Y) + coef_a · A Y``.
    """
    # Written transposed so that the full-size A is on the right of each
    # product (Xᵀ A, not Aᵀ X): on a CPU, BLAS runs such skinny products up to
    # 4× faster (LDAdam's step at rank 8 on LLaMA-60M shapes: 2× faster).
    # Yᵀ = (Tᵀ P_prev)ᵀ = coef_m · M + coef_a · P_prevᵀ A        (r, l)
    y_t = (P_prev.T @ a).mul_(coef_a).add_(M, alpha=coef_m)
    # (T Y)ᵀ = coef_m · (M Y)ᵀ P_prevᵀ + coef_a · Yᵀ Aᵀ            (r, s)
    z_t = torch.addmm((M @ y_t.T).T @ P_prev.T, y_t, a.T, beta=coef_m, alpha=coef_a)
    return orthonormalize(z_t.T)


def generalized_error_feedback_(a: Tensor, P: Tensor, R: Tensor, P_prev: Tensor, M: Tensor, M_new: Tensor,
                                beta1: float) -> Tensor:
    """``E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)``, in place in ``a``.

    What projecting the gradient dropped, plus what re-projecting the
    momentum dropped, scaled so the lost momentum mass re-enters. Equals
    ``(I - P Pᵀ)(A + β1/(1-β1) · P_prev M)`` because ``R = Pᵀ A`` and
    ``M̃ = Pᵀ P_prev M``.
    """
    k = beta1 / (1 - beta1)
    # two full-size products instead of three: A - P (R + k M̃) + k P_prev M
    a.addmm_(P, R if k == 0.0 else R + k * M_new, alpha=-1)
    if k != 0.0:
        a.addmm_(P_prev, M, alpha=k)
    return a


def transport_second_moment(V: Tensor, M: Tensor, M_new: Tensor, C: Tensor, t: int, beta1: float,
                            beta2: float) -> Tensor:
    """Projection-aware transport of Adam's second moment into a new basis.

    With ``c1 = 1-β1ᵗ``, ``c2 = 1-β2ᵗ`` and ``C = Pᵀ P_prev``:
    ``V ← c2 · | (C∘C)(V/c2 - M²/c1²) + M̃²/c1² |`` -- transport the
    per-coordinate variance ``V̂ - M̂²`` (coordinates taken independent), add
    back the squared transported mean, return to the raw EMA scale; ``abs``
    keeps it non-negative. Identity when ``C = I``.
    """
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    variance = V / c2 - (M / c1).square()  # V̂ - M̂²: (r, l)
    return torch.addmm((M_new / c1).square(), C * C, variance).abs_().mul_(c2)


class LDAdam(_Base):
    r"""LDAdam (Robert et al., ICLR 2025), following the official code's update.

    Oriented gradient X (s×l), t = steps taken so far, k = t + 1::

        A ← X + E                                       (E: error-feedback buffer)
        t = 0:  P ← top-r left singular vectors of A     (SVD)
        t > 0:  T = ρ · P_prev M / (1-β1ᵗ) + (1-ρ) · A
                P ← orth(T (Tᵀ P_prev))                  (one warm-started power iteration)
        R ← Pᵀ A
        C ← Pᵀ P_prev ;  M̃ ← C M                        (first moment into the new basis)
        E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)     (generalized error feedback)
        V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²| ;  M ← M̃   (projection-aware V)
        M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R²
        W ← W (1 - lr·wd) - lr · P (M/(1-β1ᵏ)) / (sqrt(V/(1-β2ᵏ)) + ε)

    Defaults are the official code's: ``lr=1e-3, betas=(0.908, 0.99),
    eps=1e-8, weight_decay=0, rho=0.908, error_feedback=True``; ``rank`` per
    group (the GaLore convention), other groups plain AdamW. Options:
    ``proj_method`` (``"power"``, or ``"svd"`` for the top-r of T),
    ``error_dtype`` (None: the precision of the step's linear algebra, i.e.
    float32, or float64 for a float64 parameter; torch.bfloat16 halves the
    buffer).

    Orientation as the official code: the rows are projected when m <= n
    (P is m×r; square matrices included) and the columns when m > n. (GaLore's
    rule transposes square matrices; for LDAdam we follow its own code.)

    Deliberate change from the official code: the error buffer is an explicit
    optimizer-state tensor ``error`` rather than living in ``p.grad``, so
    ``zero_grad(set_to_none=True)``, gradient clipping and DDP's gradient
    averaging never touch it. It costs m·n floats per low-rank matrix::

        opt = LDAdam(lowrank_groups(model, rank=128), lr=1e-3)
    """

    group_keys = ("rank",)
    _refused_hints = {
        "scale": "LDAdam's update P N has no GaLore scale α; remove 'scale' (or multiply lr by it)",
        "update_proj_gap": "LDAdam refreshes its subspace every step; remove 'update_proj_gap'",
        "error_dtype": "it is a constructor argument, LDAdam(..., error_dtype=torch.bfloat16)",
    }

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rho: float = 0.908, error_feedback: bool = True,
                 proj_method: str = "power", error_dtype: Optional[torch.dtype] = None, check_finite: bool = True):
        if error_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"Invalid error_dtype: {error_dtype}")
        self.error_dtype = error_dtype
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho,
                        error_feedback=error_feedback, proj_method=proj_method, check_finite=check_finite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        _check(0.0 <= group["rho"] <= 1.0, f"Invalid rho: {group['rho']}")
        _check(group["proj_method"] in ("power", "svd"),
               f"Invalid proj_method: {group['proj_method']!r} (expected 'power' or 'svd')")
        if group.get("rank") is not None:
            _validate_rank(group)

    def _step_items(self, items: list[tuple[Tensor, dict, int]]) -> None:
        self._update_each(items, self._ldadam_step)

    def _check_state(self, p: Tensor, group: dict) -> None:
        super()._check_state(p, group)
        rank = self.state.get(p, {}).get("rank")
        if rank is not None and group.get("rank") is not None and rank != min(group["rank"], min(p.shape)):
            raise ValueError(f"LDAdam: the rank of the group of a parameter of shape {tuple(p.shape)} changed from "
                             f"{rank} to {group['rank']} after it took steps; LDAdam's subspace is tracked from step "
                             "to step at one rank (nothing was changed). Set the rank back, or give the parameter "
                             "to a new optimizer")

    def _ldadam_step(self, p: Tensor, group: dict, index: int) -> None:
        """One LDAdam step of one matrix: the algorithm box above, line by line."""
        state = self.state[p]
        transposed = p.shape[0] > p.shape[1]  # the official rule: rows projected when m <= n
        X = oriented_grad(p, transposed)  # X: (s, l)
        ef = group["error_feedback"]
        if len(state) == 0:
            state["step"] = 0
            state["rank"] = self._clamped_rank(p, group)
        if ef and "error" not in state:  # also when error_feedback was off until now: E starts at 0
            state["error"] = X.new_zeros(X.shape, dtype=self.error_dtype or X.dtype)  # E: (s, l), contiguous
        elif not ef:
            state.pop("error", None)  # switched off: free the buffer (m·n floats)
        t, rank = state["step"], state["rank"]
        beta1, beta2 = group["betas"]
        # A ← X + E  (in E's own buffer when the dtypes allow: E's old value is not needed again)
        if not ef:
            A = X
        elif state["error"].dtype == X.dtype:
            A = state["error"].add_(X)
        else:
            A = state["error"].to(X.dtype).add_(X)
        if t == 0:
            # P ← top-r left singular vectors of A ;  M, V ← 0
            P = top_r_basis(A, rank)
            R = P.T @ A
            M = X.new_zeros(rank, X.shape[1])  # first moment: (r, l)
            V = X.new_zeros(rank, X.shape[1])  # second moment: (r, l)
            if ef:
                A.addmm_(P, R, alpha=-1)  # E ← A - P R  (M = 0: no momentum term)
        else:
            P_prev, M, V = state["P"], state["exp_avg"], state["exp_avg_sq"]
            c1 = 1 - beta1**t
            rho = group["rho"]
            if group["proj_method"] == "power":
                # P ← orth(T (Tᵀ P_prev)),  T = ρ · P_prev M / c1 + (1-ρ) · A
                P = power_iteration_basis(A, P_prev, M, rho / c1, 1 - rho)
            else:
                # P ← top-r left singular vectors of T
                P = top_r_basis(torch.addmm(A, P_prev, M, beta=1 - rho, alpha=rho / c1), rank)
            # R ← Pᵀ A
            R = P.T @ A
            # C ← Pᵀ P_prev ;  M̃ ← C M
            C = P.T @ P_prev
            M_new = C @ M
            if ef:
                # E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)
                generalized_error_feedback_(A, P, R, P_prev, M, M_new, beta1)
            # V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²| ;  M ← M̃
            V = transport_second_moment(V, M, M_new, C, t, beta1, beta2)
            M = M_new
        if ef and A is not state["error"]:
            state["error"].copy_(A)
        # M, V ← Adam moments of R ;  N ← M̂ / (sqrt(V̂) + ε)
        N = adam_normalized_(M, V, R, t + 1, beta1, beta2, group["eps"])
        # W ← W (1 - lr·wd) - lr · P N
        apply_update_(p, back_project(P, N, transposed), group["lr"], group["weight_decay"])
        # P contiguous: QR gives it column-major, and a loaded checkpoint holds it row-major
        state.update(step=t + 1, P=P.contiguous(), exp_avg=M, exp_avg_sq=V)


# =============================================================================
# 6. Adapprox: Adam's second moment as an adaptive-rank randomized factorization
# =============================================================================


def srsi(V: Tensor, rank: int, oversample: int = 5, power_iters: int = 1,
         generator: Optional[torch.Generator] = None, init: Optional[Tensor] = None,
         omega: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Streamlined randomized subspace iteration: ``V ≈ Q Uᵀ`` of rank ``rank``.

    ``Q`` (m×k) has orthonormal columns and ``U = Vᵀ Q`` (n×k), so ``Q Uᵀ``
    is the projection of V onto a k-dimensional approximate top subspace::

        Ω ~ N(0, 1), n×(k+p)                  (from ``generator``)
        Q ← orth(V Ω)                          (cold start)
        Q ← orth([Q₀[:, :k], V Ω'])            (warm start from ``init`` = Q₀;
                                                Ω' has only the p missing columns)
        repeat l times:  Q ← orth(V orth(Vᵀ Q))   (orthonormalized after every
                                                    product, for float32 stability)
        B ← Qᵀ V = Ũ Σ W̃ᵀ                     (small SVD)
        Q ← Q Ũ[:, :k] ;  U ← W̃[:, :k] Σ_k

    A warm start is ours: the second moment changes by only
    (1-β2)·G² per step, so last step's Q already spans most of this step's
    top subspace, and one power iteration does what five do from scratch.
    ``omega`` may be drawn beforehand (``sketch_columns`` says how many
    columns); ``generator`` is then unused.
    """
    m, n = V.shape
    V = V.to(linalg_dtype(V.dtype))
    warm = init[:, :min(rank, m, n)] if init is not None else V.new_zeros(m, 0)
    if omega is None:
        omega = torch.randn(n, sketch_columns(V.shape, rank, oversample, init), generator=generator,
                            device=V.device, dtype=V.dtype)
    # Every product keeps V on the right (Xᵀ V, Xᵀ Vᵀ, then transposed views):
    # on a CPU, BLAS runs these skinny products about 4× faster than V X.
    Q = orthonormalize(torch.cat([warm.to(V.dtype), (omega.T @ V.T).T], dim=1))  # orth([Q₀, V Ω]): (m, k+p)
    for _ in range(power_iters):
        Y = orthonormalize((Q.T @ V).T)  # orth(Vᵀ Q): (n, k+p)
        Q = orthonormalize((Y.T @ V.T).T)  # orth(V Y): (m, k+p)
    u_b, sigma, w_bh = torch.linalg.svd(Q.T @ V, full_matrices=False)  # B: (k+p, n)
    k = min(rank, m, n)
    return Q @ u_b[:, :k], (w_bh[:k].T * sigma[:k]).contiguous()  # contiguous: saved and loaded as it is


def sketch_columns(shape: Sequence[int], rank: int, oversample: int, init: Optional[Tensor] = None) -> int:
    """Columns of the Gaussian sketch Ω that ``srsi`` needs: k + p in all
    (at most min(m, n)), less those a warm start ``init`` already provides."""
    width = min(rank + oversample, *shape)
    return width - (0 if init is None else min(init.shape[1], rank, width))


def srsi_relative_error(V: Tensor, U: Tensor) -> Tensor:
    """``ξ = ‖V - Q Uᵀ‖_F / ‖V‖_F`` without forming the difference.

    Exact for the output of ``srsi`` (``Q Uᵀ`` is the orthogonal projection of
    V, so ``‖V - Q Uᵀ‖² = ‖V‖² - ‖U‖²``); 0 for an all-zero V. Float32
    cancellation limits its resolution to about 1e-3, and the squares of
    entries below about 1e-19 underflow (Adapprox scales V first).
    """
    v2 = torch.linalg.vector_norm(V).square()
    u2 = torch.linalg.vector_norm(U).square()
    return torch.where(v2 > 0, (v2 - u2).clamp_min(0).sqrt() / v2.sqrt().clamp_min(1e-30), torch.zeros_like(v2))


def next_rank(rank: int, err_ema: float, err_tol: float, k_min: int, k_max: int, rank_step: int) -> int:
    """Adaptive rank with hysteresis: grow while the smoothed error is above
    ``err_tol``, shrink when it is below ``err_tol / 2``, by at most
    ``rank_step``, within ``[k_min, k_max]`` (our concrete rule)."""
    if err_ema > err_tol:
        rank += rank_step
    elif err_ema < err_tol / 2:
        rank -= rank_step
    return max(k_min, min(k_max, rank))


def row_col_scales(v: Tensor) -> tuple[Tensor, Tensor]:
    """Adafactor's rank-1 estimate ``row colᵀ`` of a non-negative V, as the two
    vectors Adapprox divides V by: ``row = V 1 / 1ᵀ V 1`` (the rows' shares,
    summing to 1) and ``col = 1ᵀ V`` (the column sums). Each is clamped from
    below, rows at 2^-40, columns at 2^-40 of V's total (and at float's
    smallest normal number, for an all-zero V): since V_ij is at most its row's
    and its column's sum, every V_ij / (row_i col_j) is then at most 2^40, so
    squares and sums of squares stay inside float32's range, and the clamped
    vectors multiply back exactly what they divided."""
    total = v.sum()
    row = (v.sum(dim=1) / total.clamp_min(torch.finfo(v.dtype).tiny)).clamp_min(2.0**-40)
    col = torch.maximum(v.sum(dim=0), 2.0**-40 * total).clamp_min(torch.finfo(v.dtype).tiny)
    return row, col


# How a rank-k reconstruction Q Uᵀ of the (non-negative) second moment is
# made non-negative before its square root (see the Adapprox docstring).
NONNEG_RULES = ("abs", "floor", "clamp")


class Adapprox(_Base):
    r"""Adapprox (Zhao et al. 2024): Adam with a randomized low-rank second moment.

    Every 2-D parameter with min(m, n) >= 2 (embeddings and LM head too,
    unless its group says ``rank=None``; see ``group_keys`` below and
    ``lowrank_groups``) keeps ``V ≈ Q Uᵀ`` of rank k instead of a dense m×n
    second moment::

        V ← β2 · diag(r) Q Uᵀ diag(c) + (1-β2) · G²   (a temporary; step 1: (1-β2)·G²)
        V ← max(V, 0) ;  r ← V 1 / 1ᵀ V 1 ;  c ← 1ᵀ V   (row shares, column sums: "Row/column scaling")
        N ← V / (r cᵀ)                          (V relative to Adafactor's rank-1 estimate r cᵀ)
        Q, U ← S-RSI(N, k, p, l)               (see ``srsi``; warm-started from Q)
        ξ ← ‖N - Q Uᵀ‖ / ‖N‖ ;  ξ̄ ← EMA of ξ ;  k ← next_rank(k, ξ̄)   (for the next step)
        δ ← ‖N - Q Uᵀ‖ / sqrt(m·n)              (the RMS error of the factorization)
        V̂ ← diag(r) max(|Q Uᵀ|, δ) diag(c) / (1-β2ᵗ)   (``nonneg``: see below; the floor δ: "Resolution")
        M ← β1 M + (1-β1) G ;  D ← (M/(1-β1ᵗ)) / (sqrt(V̂) + ε)    (β1 = 0: D ← G/(sqrt(V̂)+ε), no M)
        D ← D / max(1, RMS(D)/d)               (update clipping; d = clip_threshold)
        D ← D · (1 + cos(M, G))                (cosine guidance, optional)
        W ← W (1 - lr·wd) - lr · D

    With ``row_col_scaling=False`` r and c are 1 (V itself is factored, as
    in the paper). Other parameters keep an exact dense V and the same rule.
    Full rank (ours): at k = min(m, n) Q and U would hold k·(m+n) >= m·n
    numbers for an exact factorization, so V is kept dense instead (state
    ``V``), V̂ = V, ξ = 0. With clipping and guidance off both are AdamW.

    The paper's full text was not available to us; these choices are ours.
    S-RSI orthonormalizes after every product, warm-started from last step's
    Q with one power iteration (``warm_start=False, power_iters=5``: a cold
    start as in the paper; step 1 is cold). ``k_max = max(1, ⌊k_max_frac ·
    min(m, n)⌋)``; 0.25 reproduces the paper's 34.5-49.9 % memory saving.
    The rank starts at ``k_max`` (or ``rank_init``) and, while ξ < err_tol/2,
    halves each step (by at least ``rank_step``; the EMA reseeded at each
    rank), reaching its working level in about log2(k_max) steps. After the
    first step that does not halve it follows ``next_rank`` (± ``rank_step``,
    hysteresis ``[err_tol/2, err_tol]`` on an EMA of ξ, ``err_beta``), never
    halving again, so it cannot flap; ``err_tol=0`` grows every rank to k_max
    and holds it. Clipping follows Adafactor; guidance scales by ``1 + cos``.

    Non-negativity (``nonneg``). A rank-k reconstruction of V undershoots
    below 0 in places. ``"clamp"`` (max(QUᵀ, 0)) gives sqrt(V̂) = 0 there, D
    = M/ε explodes and clipping shrinks every other coordinate; ``"floor"``
    (max(QUᵀ, (1-β2)·G²), a true lower bound) is still ~1000× below a
    settled V; ``"abs"`` (|QUᵀ|, the default, as LDAdam treats its moved
    second moment) keeps the error's magnitude and trains as well as AdamW.

    Row/column scaling (ours, ``row_col_scaling``). Adam reads V entry by
    entry, but a factorization's error lies at one absolute level for all
    entries: rows and columns with small gradients (a rare token's embedding
    row, a quiet unit) drown in it, their V̂ is the error, which the smallest
    change of the gradients redraws, and the trajectory amplifies tiny
    gradient noise far beyond AdamW's (``bench.py sensitivity``). So V is
    divided by Adafactor's rank-1 estimate r cᵀ (m + n numbers, kept with Q
    and U), the quotient N is factored, and V̂ multiplies the scales back:
    the error becomes relative to each entry's row and column. Negative
    entries of the EMA (a past undershoot) are set to 0 first;
    ``row_col_scales`` clamps r and c so that N stays in float32's range.

    Resolution (the floor δ, ours). An entry of N far below δ, the RMS of
    the factorization's error, would again be noise: flooring at δ says
    "below this level we do not know V" and keeps the ``abs``/``clamp`` kink
    at 0 out of reach. δ is formed exactly from the residual in N's buffer
    (``‖N‖² - ‖U‖²`` cancels in float32), and so is ξ.

    ``err_tol`` default 0.5 (ξ of the scaled N), chosen by measurement
    (docs/RESULTS.md): from 0.2 to 0.5 the loss is flat and below AdamW's;
    the ranks stay high while V is young, then fall to 1, the cheapest.

    Precision (``factor_dtype="float64"``, ours). V is formed, factored and
    kept in float64; M and the update stay float32. In float32, V's rounding
    (about 1e-7 of its largest singular value in each entry) decides its
    weak singular directions, the smallest perturbation of the gradients
    redraws them at every later step, and the trajectory amplified 1e-7
    gradient noise up to 25,000× more than AdamW's (one seed of five).
    ``"float32"`` halves the bytes of V's temporary and of Q, U, r and c; it
    is also what MPS gets, which has no float64.

    State per factored matrix: Q and U (k·(m+n) numbers), r and c (m + n), the
    exponent h, M (m·n) unless β1 = 0; at full rank V (m·n) in place of Q, U,
    r, c. Per step: an m×n temporary (V, the residual, V̂) and a float32
    update (float32 factors: one buffer; ``"floor"`` adds one, a bf16
    parameter its float32 gradient), six skinny m·n·(k+p) products, one host
    sync for all matrices (the next ranks) besides the NaN/Inf check's. V is
    formed at a power-of-two scale 4^-h that brings it to about 1; U (with
    scaling: c; at full rank: V) is kept at that scale with its exponent
    (``u_exp``), so no square leaves float32's range for any finite gradient
    (2^-100 to 2^100 tested).

    Ω of parameter i at step t is drawn from a generator seeded with
    ``stream_seed(state["seed"], t)``, ``state["seed"] = stream_seed(seed, i)``
    (counter-based): every DDP rank draws the same Ω, and a resumed run is
    bit-exact (CPU and CUDA draw different numbers)::

        opt = Adapprox(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    """

    # ``rank`` in a group, the key ``lowrank_groups`` writes: an integer caps
    # the adaptive rank of that group's matrices (k_max = min(rank, min(m, n)),
    # in place of k_max_frac); None keeps AdamW's dense V for the whole group.
    # So ``Adapprox(lowrank_groups(model, 64))`` factors exactly the matrices
    # the other optimizers would project, and a group without the key factors
    # every matrix, as in the paper. A group's rank may change between steps:
    # a lower cap holds from the next step, and between None and an integer V
    # is carried over (``_convert_second_moment``). Only 2-D tensors may be in
    # a group with an integer rank, as for the other optimizers.
    group_keys = ("rank",)
    _dense_elementwise = False  # clipping and guidance read the whole tensor: under FSDP2 it is stepped whole

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, k_max_frac: float = 0.25, k_min: int = 1,
                 rank_init: Optional[int] = None, err_tol: float = 0.5, err_beta: float = 0.9, rank_step: int = 1,
                 oversample: int = 5, power_iters: int = 1, warm_start: bool = True, nonneg: str = "abs",
                 clip_threshold: Optional[float] = 1.0, cosine_guidance: bool = False, row_col_scaling: bool = True,
                 factor_dtype: str = "float64", seed: int = 0, check_finite: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k_max_frac=k_max_frac, k_min=k_min,
                        rank_init=rank_init, err_tol=err_tol, err_beta=err_beta, rank_step=rank_step,
                        oversample=oversample, power_iters=power_iters, warm_start=warm_start, nonneg=nonneg,
                        clip_threshold=clip_threshold, cosine_guidance=cosine_guidance,
                        row_col_scaling=row_col_scaling, factor_dtype=factor_dtype, seed=seed,
                        check_finite=check_finite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        g = group
        _check(0.0 < g["k_max_frac"] <= 1.0, f"Invalid k_max_frac: {g['k_max_frac']}")
        _check(isinstance(g["k_min"], int) and g["k_min"] >= 1, f"Invalid k_min: {g['k_min']}")
        _check(g["rank_init"] is None or (isinstance(g["rank_init"], int) and g["rank_init"] >= 1),
               f"Invalid rank_init: {g['rank_init']}")
        _check(g["err_tol"] >= 0.0, f"Invalid err_tol: {g['err_tol']}")
        _check(0.0 <= g["err_beta"] < 1.0, f"Invalid err_beta: {g['err_beta']}")
        _check(isinstance(g["rank_step"], int) and g["rank_step"] >= 1, f"Invalid rank_step: {g['rank_step']}")
        _check(isinstance(g["oversample"], int) and g["oversample"] >= 0, f"Invalid oversample: {g['oversample']}")
        _check(isinstance(g["power_iters"], int) and g["power_iters"] >= 0,
               f"Invalid power_iters: {g['power_iters']}")
        _check(g["clip_threshold"] is None or g["clip_threshold"] > 0,
               f"Invalid clip_threshold: {g['clip_threshold']} (use > 0, or None for off)")
        _check(not g["cosine_guidance"] or g["betas"][0] > 0,
               "Invalid cosine_guidance: it needs a first moment (betas[0] > 0)")
        _check(isinstance(g["seed"], int) and not isinstance(g["seed"], bool), f"Invalid seed: {g['seed']!r}")
        _check(isinstance(g["row_col_scaling"], bool), f"Invalid row_col_scaling: {g['row_col_scaling']!r}")
        _check(g["factor_dtype"] in ("float32", "float64"),
               f"Invalid factor_dtype: {g['factor_dtype']!r} (expected 'float32' or 'float64')")
        _check(g["nonneg"] in NONNEG_RULES, f"Invalid nonneg: {g['nonneg']!r} (expected one of {NONNEG_RULES})")
        if g.get("rank") is not None:
            _check(isinstance(g["rank"], int) and not isinstance(g["rank"], bool) and g["rank"] >= 1,
                   f"Invalid rank: {g['rank']!r} (an integer >= 1, or None for a dense second moment)")
            for p in g["params"]:
                _check(p.dim() == 2, f"Invalid parameter in a 'rank' group: shape {tuple(p.shape)} is not 2-D "
                                     "(put 1-D and other tensors in a group without 'rank')")

    def load_state_dict(self, state_dict: dict) -> None:
        """As every optimizer here, plus: a state dict written before U was
        kept at scale (no ``u_exp``) holds U itself, i.e. U at scale 4^0."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "U" in state and "u_exp" not in state:
                state["u_exp"] = state["U"].new_zeros(())

    # -- ranks -------------------------------------------------------------
    @staticmethod
    def is_factored(p: Tensor, group: Optional[dict] = None) -> bool:
        """Adapprox factors every 2-D tensor with min(m, n) >= 2, except in a
        group whose ``rank`` is None (there V stays dense, as in AdamW)."""
        return p.dim() == 2 and min(p.shape) >= 2 and (group is None or "rank" not in group
                                                       or group["rank"] is not None)

    @staticmethod
    def rank_bounds(p: Tensor, group: dict) -> tuple[int, int]:
        """[k_min, k_max] with k_max = max(1, ⌊k_max_frac · min(m, n)⌋), or
        k_max = min(rank, min(m, n)) in a group with an integer ``rank``."""
        if group.get("rank") is not None:
            k_max = min(group["rank"], min(p.shape))
        else:
            k_max = max(1, int(group["k_max_frac"] * min(p.shape)))
        return min(group["k_min"], k_max), k_max

    @staticmethod
    def factor_dtype(p: Tensor, group: dict) -> torch.dtype:
        """The dtype V is formed, factored and kept in: float64 if the group asks
        for it (except on MPS, which has no float64) or the parameter is float64, else float32."""
        wide = group.get("factor_dtype") == "float64" and p.device.type != "mps"
        return torch.float64 if wide else linalg_dtype(p.dtype)

    def _initial_rank(self, p: Tensor, group: dict) -> int:
        k_min, k_max = self.rank_bounds(p, group)
        return k_max if group["rank_init"] is None else max(k_min, min(k_max, group["rank_init"]))

    def ranks(self) -> list[int]:
        """Current rank k of each factored parameter, in param-group order."""
        return [self.state[p]["rank"] if "rank" in self.state.get(p, {}) else self._initial_rank(p, g)
                for g in self.param_groups for p in g["params"] if self.is_factored(p, g)]

    # -- the step ----------------------------------------------------------
    def _check_state(self, p: Tensor, group: dict) -> None:
        pass  # a group's rank may change between int and None: ``_convert_second_moment`` carries V over

    def _convert_second_moment(self, p: Tensor, group: dict) -> None:
        """Carry V over when the group's ``rank`` went from None to an integer
        (dense V → factored from the next step, starting as a fresh one at
        k_max) or back (factored → dense: V = diag(row) Q Uᵀ diag(col) · 4^e,
        negative entries of the reconstruction set to 0)."""
        state = self.state.get(p, {})
        if self.is_factored(p, group) and "exp_avg_sq" in state:
            V = state.pop("exp_avg_sq")
            state.update(V=V.to(self.factor_dtype(p, group)), u_exp=V.new_zeros((), dtype=self.factor_dtype(p, group)),
                         rank=self._initial_rank(p, group), err_ema=0.0, descending=True)
        elif not self.is_factored(p, group) and "u_exp" in state:
            scale = torch.exp2(2 * state["u_exp"])  # the factors are kept at the scale 4^-e
            if "V" in state:
                V = state["V"] * scale
            else:
                Q, U = state["Q"], state["U"]
                if "row" in state:
                    Q, U = Q * state["row"][:, None], U * state["col"][:, None]
                V = (Q @ U.T).clamp_min_(0) * scale
            for key in ("Q", "U", "row", "col", "V", "u_exp", "rank", "err_ema", "descending"):
                state.pop(key, None)
            state["exp_avg_sq"] = V.to(linalg_dtype(p.dtype))

    def _step_items(self, items: list[tuple[Tensor, dict, int]]) -> None:
        for p, group, _ in items:
            self._convert_second_moment(p, group)
        factored = [(p, group) for p, group, _ in items if self.is_factored(p, group)]
        sketches = iter(self._draw_sketches([item for item in items if self.is_factored(item[0], item[1])]))
        errors = []
        for p, group, _ in items:
            if self.is_factored(p, group):
                errors.append(self._factored_step(p, group, next(sketches)))
            else:
                self._dense_adapprox_step(p, group)
        if factored:
            # ξ̄ ← EMA of ξ ;  k ← next_rank(k, ξ̄): one host sync for all matrices
            for (p, group), xi in zip(factored, torch.stack([e.to(errors[0].device) for e in errors]).tolist()):
                state = self.state[p]
                b = group["err_beta"]
                descending = state.get("descending", state["step"] == 1)
                state["err_ema"] = xi if descending else b * state["err_ema"] + (1 - b) * xi
                k_min, k_max = self.rank_bounds(p, group)
                if descending and state["err_ema"] < group["err_tol"] / 2 and state["rank"] > k_min:
                    # initial descent: k ← max(k_min, min(k - rank_step, ⌊k/2⌋)), ξ̄ reseeded at the new rank
                    state["rank"] = max(k_min, min(state["rank"] - group["rank_step"], state["rank"] // 2))
                    state["descending"] = True
                else:
                    state["descending"] = False  # settled: from now on next_rank's steps
                    state["rank"] = next_rank(state["rank"], state["err_ema"], group["err_tol"], k_min, k_max,
                                              group["rank_step"])

    @torch.compiler.disable
    def _draw_sketches(self, items: list[tuple[Tensor, dict, int]]) -> list[Tensor]:
        """Ω of this step for each factored matrix, drawn before any of them is
        updated. The draws use seeded generators, which torch.compile cannot
        trace; drawing them all here, in one uncompiled call, keeps the
        per-matrix arithmetic free of graph breaks (a break inside it made the
        compiler mix up the shapes of different parameters)."""
        omegas = []
        for p, group, index in items:  # index: the parameter's position, which (with the seed) seeds its sketches
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["rank"] = self._initial_rank(p, group)
                state["err_ema"] = 0.0
            state.setdefault("seed", stream_seed(group["seed"], index))  # Ω at step t: stream_seed(this, t)
            k_min, k_max = self.rank_bounds(p, group)
            state["rank"] = max(k_min, min(k_max, state["rank"]))  # a group's rank lowered since: the cap holds now
            if state["rank"] >= min(p.shape):  # full rank: V is kept dense, nothing is sketched
                omegas.append(None)
                continue
            warm = state.get("Q") if group["warm_start"] else None
            columns = sketch_columns(p.shape, state["rank"], group["oversample"], warm)
            rng = self._generator(p.device, stream_seed(state["seed"], state["step"] + 1))
            omegas.append(torch.randn(p.shape[1], columns, generator=rng, device=p.device,
                                      dtype=self.factor_dtype(p, group)))
        return omegas

    def _factored_step(self, p: Tensor, group: dict, omega: Optional[Tensor]) -> Tensor:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        g = p.grad.to(linalg_dtype(p.dtype))  # G: (m, n)
        if beta1 > 0 and "exp_avg" not in state:  # also when betas[0] was 0 until now: M starts at 0
            state["exp_avg"] = torch.zeros_like(g)  # M: (m, n)
        elif beta1 == 0:
            state.pop("exp_avg", None)  # betas[0] set to 0: no first moment any more
        t = state["step"] + 1
        fd = self.factor_dtype(p, group)  # V's dtype: float64 by default (see "Precision")
        for key in [k for k in ("Q", "U", "row", "col", "V", "u_exp") if k in state]:  # a changed factor_dtype:
            state[key] = state[key].to(fd)  # converted once (.to is a no-op on a tensor already in fd)
        full = state["rank"] >= min(p.shape)  # V kept dense: exact, and m·n <= k·(m+n) numbers ("Full rank")
        # Everything below runs at the scale 4^-h, h = ⌊log2 max(max|G|, sqrt(max|V_{t-1}|))⌋, so G·2^-h
        # and V/4^h have entries of at most about 1: powers of two scale exactly, float32 squares do not
        # (G² overflows above 2^64, underflows below 2^-75). U (or V) is stored at scale, e = state["u_exp"].
        lo, hi = torch.aminmax(g)
        size = torch.log2(torch.maximum(hi, -lo)).to(fd)
        if t > 1:
            e = state["u_exp"]
            if "V" in state:  # the previous V is dense
                top = state["V"].amax()
            else:
                Q_prev, U_prev = state["Q"], state["U"]
                if "row" in state:  # the previous V was stored as diag(row) · Q Uᵀ · diag(col)
                    Q_prev, U_prev = Q_prev * state["row"][:, None], U_prev * state["col"][:, None]  # skinny
                top = U_prev.abs().amax() * (Q_prev.abs().amax() if "row" in state else 1.0)  # |Q Uᵀ| <= this
            size = torch.maximum(size, e + 0.5 * torch.log2(top))
        h = torch.floor(size).clamp(-126, 126)  # an integer; all-zero G and V: any h will do
        # V/4^h ← (1-β2) · (G·2^-h)² + β2 · Q (U · 4^(e-h))ᵀ   (the step's m×n temporary, in the factor dtype;
        # with row/column scaling Q and U above already carry diag(row) and diag(col))
        v = g.to(fd, copy=True).mul_(torch.exp2(-h)).square_().mul_(1 - beta2)
        if t > 1 and "V" in state:
            v.addcmul_(state["V"], torch.exp2(2 * (e - h).clamp(-63, 63)), value=beta2)
        elif t > 1:
            v.addmm_(Q_prev, (U_prev * torch.exp2(2 * (e - h).clamp(-63, 63))).T, alpha=beta2)
        if full:  # V̂ ← max(V, 0), ξ = 0: no factorization (V kept at scale 4^-h in place of Q, U, row, col)
            for key in ("Q", "U", "row", "col"):
                state.pop(key, None)
            v.clamp_min_(0)  # a negative entry is the error of a factorization before the rank grew
            state["V"] = state["V"].copy_(v) if "V" in state else v.clone()
            xi, v_hat = torch.zeros_like(h), v
        else:
            state.pop("V", None)
            xi, v_hat = self._factor_second_moment(v, g, h, state, group, omega)
        state.update(step=t, u_exp=h)
        # denom ← sqrt(V̂ / (1-β2ᵗ)) + ε = sqrt(V̂/4^h) · 2^h / sqrt(1-β2ᵗ) + ε   (in place)
        denom = v_hat.sqrt_().mul_(torch.exp2(h)).div_((1 - beta2**t) ** 0.5).add_(group["eps"])
        del v, v_hat
        denom = denom.to(g.dtype)  # float64 V: the update is float32 (a second m×n temporary; V's is freed)
        self._apply_direction(p, g, denom, state, group, t)
        return xi

    def _factor_second_moment(self, v: Tensor, g: Tensor, h: Tensor, state: dict, group: dict,
                              omega: Tensor) -> tuple[Tensor, Tensor]:
        """V/4^h in ``v`` → Q, U (row, col) in ``state``; returns ξ and V̂/4^h (in ``v``'s buffer)."""
        beta2 = group["betas"][1]
        scaled = group["row_col_scaling"]
        if scaled:
            # V ← max(V, 0)   (V is a second moment; a negative entry is the factorization's error)
            # row ← V 1 / 1ᵀ V 1 ;  col ← 1ᵀ V ;  N ← V / (row colᵀ)   (Adafactor's rank-1 estimate divided out)
            v.clamp_min_(0)
            row, col = row_col_scales(v)
            v.div_(row[:, None]).div_(col[None, :])
        # Q, U ← S-RSI(N, k, p, l), warm-started from the previous Q   (N = V/4^h without scaling)
        warm = state.get("Q") if group["warm_start"] else None
        Q, U = srsi(v, state["rank"], group["oversample"], group["power_iters"], init=warm, omega=omega)
        # δ ← ‖N - Q Uᵀ‖ / sqrt(m·n) ;  ξ ← ‖N - Q Uᵀ‖ / ‖N‖   (the residual formed in N's buffer, exactly:
        # the cheap ‖N‖² - ‖U‖² cancels in float32 below ξ ≈ 1e-3, and δ must resolve the rounding level)
        norm_v = torch.linalg.vector_norm(v)
        residual = torch.linalg.vector_norm(v.addmm_(Q, U.T, alpha=-1))
        xi = torch.where(norm_v > 0, residual / norm_v.clamp_min(1e-30), torch.zeros_like(norm_v))
        delta = residual / math.sqrt(v.numel())
        # N̂ ← max(nonneg(Q Uᵀ), δ)   (written into N's buffer, whose values beta=0 ignores; see ``nonneg``)
        v_hat = v.addmm_(Q, U.T, beta=0)
        if group["nonneg"] == "abs":
            v_hat.abs_()
        elif group["nonneg"] == "clamp":
            v_hat.clamp_min_(0)
        else:  # "floor": the EMA is at least its newest term, V >= (1-β2)·G²
            floor = torch.mul(g, torch.exp2(-h)).square_().mul_(1 - beta2)
            if scaled:
                floor.div_(row[:, None]).div_(col[None, :])
            v_hat.clamp_min_(floor)
        v_hat.clamp_min_(delta)  # no entry below the factorization's error level (see "Resolution" above)
        if scaled:
            v_hat.mul_(row[:, None]).mul_(col[None, :])  # V̂/4^h ← diag(row) N̂ diag(col)
            state.update(row=row, col=col)
        else:
            state.pop("row", None), state.pop("col", None)
        state.update(Q=Q, U=U)
        return xi, v_hat

    def _dense_adapprox_step(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        g = p.grad.to(linalg_dtype(p.dtype))
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg_sq"] = torch.zeros_like(g)  # exact V for tensors that are not factored
        if beta1 > 0 and "exp_avg" not in state:  # also when betas[0] was 0 until now: M starts at 0
            state["exp_avg"] = torch.zeros_like(g)
        elif beta1 == 0:
            state.pop("exp_avg", None)  # betas[0] set to 0: no first moment any more
        t = state["step"] = state["step"] + 1
        # V ← β2 V + (1-β2) G²
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # denom ← sqrt(V / (1-β2ᵗ)) + ε
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        self._apply_direction(p, g, denom, state, group, t)

    def _apply_direction(self, p: Tensor, g: Tensor, denom: Tensor, state: dict, group: dict, t: int) -> None:
        """Steps shared by factored and dense tensors, from ``denom = sqrt(V̂) + ε``
        on; ``denom`` is overwritten with the update D."""
        beta1 = group["betas"][0]
        if beta1 > 0:
            # M ← β1 M + (1-β1) G ;  D ← (M / denom) / (1-β1ᵗ)
            m = state["exp_avg"].lerp_(g, 1 - beta1)
            d = denom.reciprocal_().mul_(m).div_(1 - beta1**t)
        else:
            # D ← G / denom
            m = None
            d = torch.div(g, denom, out=denom)
        if group["clip_threshold"] is not None:
            # D ← D / max(1, RMS(D)/d)
            d.div_((rms(d) / group["clip_threshold"]).clamp_min(1.0))
        if group["cosine_guidance"]:
            # D ← D · (1 + cos(M, G))
            cos = torch.dot(m.flatten(), g.flatten()) / (torch.linalg.vector_norm(m) * torch.linalg.vector_norm(g)
                                                         ).clamp_min(1e-30)
            d.mul_(1 + cos)
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, d, group["lr"], group["weight_decay"])


# =============================================================================
# 7. Helpers for users: param groups and state memory
# =============================================================================


def lowrank_groups(model: nn.Module, rank: int, *, targets: Sequence[str] = ("attn", "mlp"),
                   embeddings: bool = False, verbose: bool = False, **group_options) -> list[dict]:
    """Param groups in the GaLore / LDAdam convention, for any of the four optimizers.

    Every 2-D parameter whose qualified name (``model.named_parameters()``)
    contains one of ``targets`` goes into a group ``{"params": ..., "rank":
    rank, **group_options}``; every other parameter (embeddings, norms, LM
    head, biases) into a group ``{"params": ..., "rank": None}``, which each
    optimizer here updates densely (AdamW; Adapprox with a dense V). Empty
    groups are left out.

    The selection is by name and shape, not by module type, so it finds
    ``nn.Linear`` weights, Hugging Face GPT-2's ``Conv1D`` weights (stored
    transposed, in×out: the optimizers see the stored matrix, and a low-rank
    subspace of Gᵀ is that of G with its sides swapped) and packed
    projections such as ``nn.MultiheadAttention``'s ``in_proj_weight``
    (Q, K and V stacked: one 3d×d matrix, one subspace). The weight of an
    ``nn.Embedding`` (and an LM head tied to it) is left out unless
    ``embeddings=True``: its gradient touches only the rows of the tokens
    in the batch.

    Choosing ``targets``: substrings of the names of the big matrices inside
    the blocks. The default fits LLaMA and GPT-2 code that names them
    ``...attn...`` and ``...mlp...``; for other models name yours, e.g.
    ``targets=("self_attn", "linear1", "linear2")`` for
    ``nn.TransformerEncoderLayer``. When no pattern matches any 2-D parameter
    it warns (with the names they could have matched), since otherwise every
    matrix would silently get plain AdamW; a pattern that matches nothing
    beside one that does is normal (a model without ``attn`` blocks). ``verbose=True`` prints what was
    selected, one line per group.

    Adapprox reads a group's ``rank`` as the cap of its adaptive rank and
    ``rank=None`` as "dense", so the same list serves all four optimizers.
    """
    if isinstance(targets, str):
        targets = (targets,)
    for p in model.parameters():
        _refuse_flattened(p)  # an FSDP1-wrapped model: its weights are 1-D shards, no matrix would be found
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names: dict[int, list[str]] = {}  # every name of each tensor (a tied weight has several)
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    lowrank, rest, matrix_names = [], [], []
    matched = dict.fromkeys(targets, False)
    for key, p in tensors.items():
        hits = [t for t in targets if any(t in name for name in names[key])] if p.dim() == 2 else []
        if p.dim() == 2:
            matrix_names += names[key]
        for t in hits:
            matched[t] = True
        if hits and (embeddings or key not in embedding_weights):
            lowrank.append((names[key][0], p))
        else:
            rest.append((names[key][0], p))
    missing = [t for t, hit in matched.items() if not hit]
    if missing and not any(matched.values()):
        shown = ", ".join(matrix_names[:8]) + (", ..." if len(matrix_names) > 8 else "")
        warnings.warn(f"lowrank_groups: target(s) {missing} match no 2-D parameter of this model "
                      f"({'its 2-D parameters: ' + shown if matrix_names else 'it has none'}); "
                      "pass targets=(...) with substrings of their names", stacklevel=2)
    if verbose:
        def listing(named, shown=6):
            items = [f"{n} {'×'.join(map(str, p.shape))}" for n, p in named[:shown]]
            return ", ".join(items + ([f"... ({len(named) - shown} more)"] if len(named) > shown else []))
        print(f"lowrank_groups: {len(lowrank)} matrices at rank {rank}: {listing(lowrank) or 'none'}")
        print(f"lowrank_groups: {len(rest)} dense parameters: {listing(rest) or 'none'}")
    groups = []
    if rest:
        groups.append({"params": [p for _, p in rest], "rank": None})
    if lowrank:
        groups.append({"params": [p for _, p in lowrank], "rank": rank, **group_options})
    return groups


def layerwise_hooks(optimizer: Optimizer) -> list:
    """Update each parameter inside the backward pass, as soon as its gradient
    is ready, and free that gradient at once (GaLore's per-layer weight
    updates): the gradients of the whole model never exist together.

    Registers a post-accumulate-grad hook on every parameter of
    ``optimizer`` that calls ``optimizer.step_parameter(p)`` and then sets
    ``p.grad = None``. A training step is then ``loss.backward()`` alone: no
    ``optimizer.step()``, no ``zero_grad()``. The results equal ordinary
    steps (no parameter's update depends on another's gradient), and the
    state dict, checkpoints and LR schedulers are the ordinary ones.

    It excludes whatever needs every gradient at once: global-norm gradient
    clipping, gradient accumulation over micro-batches (the first backward
    would already step), DDP (its gradient averaging runs after the hook),
    a GradScaler (its inf check is global), and AdaptiveAdamW's allocation.

    Under FSDP2 (``fully_shard``) the hook fires after the parameter's
    reduce-scatter (FSDP2 calls the post-accumulate-grad hooks of its sharded
    DTensor parameters itself, one FSDP unit at a time, in the same order on
    every rank), and ``step_parameter`` runs ``fsdp2_step`` on that one
    parameter: its collectives (all-to-alls, and the NaN/Inf all-reduce)
    are issued per parameter instead of per step, and every rank must run
    the same backward (as FSDP2 itself requires).
    Returns the hook handles; ``handle.remove()`` on each undoes it::

        handles = layerwise_hooks(GaLoreAdamW(lowrank_groups(model, rank=128), lr=1e-2))
        for x, y in batches:
            model(x, y)[1].backward()      # every parameter is updated in here
    """
    if not hasattr(optimizer, "step_parameter"):
        raise TypeError(f"layerwise_hooks needs an optimizer of this module (with step_parameter), not "
                        f"{type(optimizer).__name__}; for plain AdamW use GaLoreAdamW(model.parameters()), "
                        "whose groups without 'rank' get exactly AdamW's update")

    for group in optimizer.param_groups:
        optimizer._check_layerwise(group)  # refuse now, not inside the first backward

    def hook(p: Tensor) -> None:
        optimizer.step_parameter(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for g in optimizer.param_groups for p in g["params"]
            if p.requires_grad]  # a frozen parameter has no gradient and takes no hook


def state_bytes(optimizer: Optimizer, by_key: bool = False):
    """Bytes held by the optimizer's state tensors (on this rank: under FSDP2,
    a DTensor counts its local shard, and a matrix's low-rank state is held
    by its owner rank alone).

    With ``by_key=True`` returns ``{state name: bytes}`` (e.g. ``exp_avg``,
    ``P``, ``error``) so a memory table can show what each part costs.
    """
    totals: dict[str, int] = {}
    for st in optimizer.state.values():
        for name, v in st.items():
            if isinstance(v, Tensor):
                v = v.to_local() if _is_dtensor(v) else v  # FSDP2: this rank's shard
                totals[name] = totals.get(name, 0) + v.numel() * v.element_size()
    return totals if by_key else sum(totals.values())


# -- FSDP2: each matrix stepped whole on one owner rank -------------------------


def _row_split(rows: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard, as FSDP2 (``torch.chunk``) cuts them:
    ⌈rows / world⌉ each, the last ones shorter or empty."""
    step = -(-rows // world)
    return [max(0, min(step, rows - r * step)) for r in range(world)]


def _owner_ranks(sizes: dict[int, int], world: int) -> dict[int, int]:
    """Owner rank of each matrix (parameter index -> its numel), balanced by
    work: in parameter order, each to the rank with the least m·n so far
    (not largest first: a param group added later then moves no matrix,
    whose state is on its owner)."""
    load, owner = [0] * world, {}
    for i in sorted(sizes):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


class _Peers:
    """The collectives of AdaptiveAdamW's global allocation under FSDP2, set
    as ``optimizer._peers`` while a sharded step runs."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device

    def sum(self, counts: list[int]) -> list[int]:
        total = torch.tensor(counts, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total, group=self.group)
        return total.tolist()

    def gather(self, records: list[tuple]) -> list[tuple]:
        """Every rank's records, ordered by their first entry (the parameter index)."""
        every: list = [None] * torch.distributed.get_world_size(self.group)
        torch.distributed.all_gather_object(every, records, group=self.group)
        return sorted((r for part in every for r in part), key=lambda r: r[0])


def _exchange(send: list[list[Tensor]], recv_numels: list[int], group, dtype: torch.dtype,
              device: torch.device) -> list[Tensor]:
    """One all-to-all: the tensors ``send[r]`` (flattened, packed) go to rank
    r; returns what each rank sent here, one flat tensor per rank."""
    parts = [t.reshape(-1).to(dtype) for ts in send for t in ts]
    inp = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_numels), dtype=dtype, device=device)
    torch.distributed.all_to_all_single(out, inp, recv_numels, [sum(t.numel() for t in ts) for ts in send],
                                        group=group)
    return list(out.split(recv_numels))


def _mesh_of(sharded: list[Tensor]):
    """The one 1-D device mesh of the DTensor parameters ``sharded``; a 2-D
    mesh (HSDP) or several meshes are refused."""
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"lowrank_adam under FSDP2: parameters on one 1-D device mesh only; a {mesh.ndim}-D "
                                  "mesh (HSDP, or sharding combined with another parallelism) is not supported. "
                                  "Shard with fully_shard on a 1-D mesh (its default). Nothing was changed.")
    if any(p.device_mesh != mesh for p in sharded):
        raise NotImplementedError("lowrank_adam under FSDP2: parameters on one 1-D device mesh only; these are on "
                                  "several meshes. Nothing was changed.")
    return mesh


def _stepped_whole(optimizer: Optimizer, p: Tensor, group: dict) -> bool:
    """Whether FSDP2 steps ``p`` (of ``group``) whole on its owner rank, not
    shard by shard: a sharded low-rank matrix, or any sharded parameter of
    an optimizer whose dense step is not elementwise (Adapprox)."""
    return _is_dtensor(p) and (group.get("rank") is not None or not getattr(optimizer, "_dense_elementwise", True))


def _as_dtensor_like(v: Tensor, p: Tensor) -> Tensor:
    """``v``, this rank's shard, as a DTensor sharded like the parameter ``p``."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


@torch.no_grad()
def fsdp2_step(optimizer: Optimizer, items: list[tuple[Tensor, dict, int]]) -> None:
    """``step()`` when FSDP2 (``fully_shard``) has sharded the parameters:
    DTensors on a 1-D mesh, split by rows (dim 0) across the ranks.

    A low-rank step needs its whole matrix (an SVD, a projection), so each
    such matrix has an owner rank (``_owner_ranks``: balanced by m·n, the
    same on every rank), which alone holds its optimizer state::

        1. NaN/Inf check of the local gradient shards, agreed by an all-reduce
        2. all-to-all: each rank sends its rows of W and G of every matrix to
           the matrix's owner, which assembles them whole
        3. each rank runs the optimizer's own step (``_step_items``) on plain
           tensors: its owned matrices whole, with their state, and its shard
           of every dense parameter (AdamW is elementwise, so exact on a
           shard; that state stays a DTensor, as torch's AdamW keeps it)
        4. all-to-all: each owner sends every rank its rows of the new W (and
           the matrix's rank, so that ``ranks()`` holds on every rank)

    So 3 collectives per step (2 with ``check_finite=False``), whatever the
    number of matrices; AdaptiveAdamW adds an all-reduce per step and, at a
    refresh, an all-gather of the spectra, so that every rank allocates the
    ranks as one process does (``_Peers``). Random draws are seeded by the
    global parameter index, so they are one process's, and so is the step:
    the same code on the same whole tensors. Adapprox (its clipping and
    guidance read a whole tensor: ``_dense_elementwise``) steps every
    parameter on an owner. Layer-wise updates (``layerwise_hooks``) call it
    with one parameter at a time, from inside FSDP2's reduce-scatter of that
    parameter's gradient: the same step, with these collectives per parameter.
    """
    opt = optimizer
    mesh = _mesh_of([p for p, _, _ in items if _is_dtensor(p)])
    group, world, me = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    device = next(p.device for p, _, _ in items if _is_dtensor(p))

    def whole(p: Tensor, g: dict) -> bool:
        return _stepped_whole(opt, p, g)

    def local(t: Tensor) -> Tensor:
        return t.to_local() if _is_dtensor(t) else t

    every = [(i, p) for i, (p, g) in enumerate((p, g) for g in opt.param_groups for p in g["params"]) if whole(p, g)]
    owner = _owner_ranks({i: p.numel() for i, p in every}, world)
    for p, g, _ in items:  # whole matrices: split by rows as torch.chunk splits them (``_row_split``)
        if _is_dtensor(p) and (p.grad.placements != p.placements or (whole(p, g) and (
                len(p.placements) != 1 or not p.placements[0].is_shard(0)
                or p.to_local().shape[0] != _row_split(p.shape[0], world)[me]))):
            raise NotImplementedError(f"lowrank_adam under FSDP2: a parameter of shape {tuple(p.shape)} with "
                                      f"placements {p.placements} (gradient {p.grad.placements}); expected Shard(0)")

    # 1. NaN/Inf: Σ g of each local shard, agreed over the ranks (then exactly, to name the culprit)
    checked = [p for p, g, _ in items if g["check_finite"]]
    for exact in (False, True):
        if not checked:
            break
        flags = torch.stack([~torch.isfinite(local(p.grad)).all() if exact else
                             ~torch.isfinite(local(p.grad).sum(dtype=torch.float32)) for p in checked])
        flags = flags.to(torch.int32)
        torch.distributed.all_reduce(flags, group=group)
        checked = [p for p, f in zip(checked, flags.tolist()) if f]
        if exact and checked:
            raise NonFiniteGradientError(
                f"{type(opt).__name__}: non-finite gradient (NaN or Inf) for the parameter of shape "
                f"{tuple(checked[0].shape)}; this call updated nothing. Lower the learning rate, clip "
                "gradients, or use a GradScaler for fp16.")

    # 2. W and G of each matrix, whole, on its owner
    mats = [(p, g, i) for p, g, i in items if whole(p, g)]
    mine = [(p, g, i) for p, g, i in mats if owner[i] == me]
    rows = {i: _row_split(p.shape[0], world) for p, _, i in mats}
    width = {i: math.prod(p.shape[1:]) for p, _, i in mats}  # numbers per row
    dtype = torch.float32
    for p, _, _ in mats:  # one dtype that holds every weight and gradient exactly
        dtype = torch.promote_types(dtype, torch.promote_types(p.dtype, p.grad.dtype))
    got = _exchange([[t for p, _, i in mats if owner[i] == r for t in (local(p), local(p.grad))] for r in range(world)],
                    [sum(2 * rows[i][r] * width[i] for _, _, i in mine) for r in range(world)], group, dtype, device)
    pieces: dict[int, tuple[list[Tensor], list[Tensor]]] = {i: ([], []) for _, _, i in mine}
    for r, flat in enumerate(got):
        for p, _, i in mine:
            for part in pieces[i]:  # this rank's rows of W, then of G
                n = rows[i][r] * width[i]
                part.append(flat[:n].view(rows[i][r], *p.shape[1:]))
                flat = flat[n:]

    # 3. this rank's part of the step: the optimizer's own code, on plain tensors
    step_items, stand_ins, shards = [], [], []
    for p, g, i in items:
        if whole(p, g):
            state = opt.state[p]
            if owner[i] != me:  # a marker, so that checkpoints hold every parameter (torch's helpers insist)
                state.setdefault("owner", owner[i])
                continue
            if "owner" in state:
                raise RuntimeError(f"lowrank_adam under FSDP2: the state of a parameter of shape {tuple(p.shape)} "
                                   f"is on rank {state['owner']}, not on this rank, its owner now (a checkpoint "
                                   "of another number of ranks? Resharding is not supported)")
            w = torch.cat(pieces[i][0]).to(p.dtype)
            w.grad = torch.cat(pieces[i][1]).to(p.grad.dtype)
            opt.state[w] = state  # the same dict: the state is the parameter's
        elif _is_dtensor(p):
            w = p.to_local()  # a view of this rank's shard
            w.grad = p.grad.to_local()
            opt.state[w] = {k: local(v) for k, v in opt.state[p].items()}
            shards.append((p, w))
        else:
            w = p
        if w is not p:
            stand_ins.append(w)
        step_items.append((w, g, i))
    opt._peers = _Peers(group, device)
    try:
        opt._step_items(step_items)
    finally:
        del opt._peers
        for p, w in shards:  # the dense state, as DTensors like the parameter
            opt.state[p] = {k: _as_dtensor_like(v, p) if isinstance(v, Tensor) and v.dim() > 0 else v
                            for k, v in opt.state[w].items()}
        for w in stand_ins:
            opt.state.pop(w, None)

    # 4. each rank's rows of every new matrix, from its owner, and the matrix's
    #    rank (-1: none), so that ``ranks()`` is right on every rank
    new = {i: w for w, _, i in step_items if i in rows}
    current = torch.tensor([opt.state[p].get("rank", -1) for p, _, _ in mine], dtype=dtype, device=device)
    got = _exchange([[new[i].narrow(0, sum(rows[i][:r]), rows[i][r]) for _, _, i in mine] + [current]
                     for r in range(world)],
                    [sum(rows[i][me] * width[i] + 1 for _, _, i in mats if owner[i] == r) for r in range(world)],
                    group, dtype, device)
    for r, flat in enumerate(got):
        theirs = [(p, i) for p, _, i in mats if owner[i] == r]
        for p, i in theirs:
            n = rows[i][me] * width[i]
            local(p).copy_(flat[:n].view(local(p).shape))
            flat = flat[n:]
        if r != me:
            for (p, _), k in zip(theirs, flat.tolist()):
                if k >= 0:
                    opt.state[p]["rank"] = int(k)


_RESUME_PATHS = ("Checkpoint with the default (sharded) get_optimizer_state_dict / set_optimizer_state_dict of "
                 "torch.distributed.checkpoint.state_dict on every rank, or with dcp.save / dcp.load, and resume "
                 "on the same number of ranks with the same param groups")


def _full_state_dict_load() -> bool:
    """Whether this call runs inside torch.distributed.checkpoint's
    ``set_optimizer_state_dict`` or ``set_state_dict`` with
    ``full_state_dict=True`` and ``broadcast_from_rank0=True``: their
    ``options`` reach ``load_state_dict`` no other way, so they are read from
    the caller's frame. (Without the broadcast each rank loads the dict it is
    given, and the layout check below tells whether that dict is its own.)"""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if (frame.f_code.co_name in ("set_optimizer_state_dict", "set_state_dict")
                    and frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict"):
                options = frame.f_locals.get("options")
                return bool(getattr(options, "full_state_dict", False) and getattr(options, "broadcast_from_rank0",
                                                                                     False))
            frame = frame.f_back
        return False
    finally:
        del frame


def _check_owner_layout(optimizer: Optimizer, state_dict: dict) -> None:
    """Refuse, before anything is loaded, a state dict whose low-rank states
    are not where this run keeps them (``load_state_dict`` calls it first).

    Under FSDP2 a matrix's state is on its owner rank alone; every other rank
    holds the marker ``{"owner": r}`` (and the matrix's ``rank``). So each
    rank's state dict fits only that rank of a run with as many ranks and
    the same param groups:

    * one process (or DDP, ZeRO-1): a state dict with markers is refused;
    * FSDP2: every rank reports what its state dict holds of each matrix
      (one all-gather), and every rank refuses, with the same message, unless
      each matrix's state is on its owner and the markers name the owner;
    * FSDP2, ``set_optimizer_state_dict`` with ``full_state_dict=True`` and
      ``broadcast_from_rank0=True``: refused on every rank. A full state dict
      is gathered to rank 0, which holds only the states it owns, and the
      broadcast hands each other rank its own current state back: those
      matrices would restart. (A full state dict that each rank is given
      whole, its owned states in place, loads: the layout check passes.)
    """
    opt, name = optimizer, type(optimizer).__name__
    saved_groups = state_dict["param_groups"]
    same_groups = len(saved_groups) == len(opt.param_groups) and all(
        len(g["params"]) == len(s["params"]) for g, s in zip(opt.param_groups, saved_groups))
    entries = [(p, s, state_dict["state"].get(i)) for g, s in zip(opt.param_groups, saved_groups)
               for p, i in zip(g["params"], s["params"])]  # (parameter, its saved group, its saved state)
    sharded = [p for g in opt.param_groups for p in g["params"] if _is_dtensor(p)]
    if not sharded:
        for p, _, st in entries:
            if isinstance(st, dict) and "owner" in st:
                raise ValueError(
                    f"{name}.load_state_dict: this state dict was written by one rank of an FSDP2 run: the state "
                    f"of the parameter of shape {tuple(p.shape)} is on rank {st['owner']}, not in it (each FSDP2 "
                    f"rank holds the states of the matrices it owns). Resharding to one process is not supported. "
                    f"{_RESUME_PATHS}. Nothing was loaded.")
        return
    mesh = _mesh_of(sharded)
    world = mesh.size()
    owner = _owner_ranks({i: p.numel() for i, (p, s, _) in enumerate(entries) if _stepped_whole(opt, p, s)}, world)
    held = {}  # what this rank's state dict holds of each parameter: "state", ("owner", r) or "mixed"
    for i, (p, _, st) in enumerate(entries):
        if isinstance(st, dict) and "owner" in st:
            held[i] = ("owner", st["owner"]) if set(st) <= {"owner", "rank"} else "mixed"
        elif st and i in owner:
            held[i] = "state"
    every: list = [None] * world
    torch.distributed.all_gather_object(every, (_full_state_dict_load(), same_groups, held), group=mesh.get_group())
    if not all(same for _, same, _ in every):
        raise ValueError(f"{name}.load_state_dict under FSDP2: the state dict's param groups differ from the "
                         f"optimizer's on rank {next(r for r, (_, same, _) in enumerate(every) if not same)}. "
                         "Nothing was loaded on any rank.")
    if owner and any(full for full, _, _ in every):
        raise ValueError(
            f"{name}.load_state_dict under FSDP2: a full state dict broadcast from rank 0 (full_state_dict=True, "
            "broadcast_from_rank0=True) cannot restore the "
            "low-rank states. Each matrix's state is held by its owner rank alone, so the full state dict that "
            "rank 0 gathers lacks the states the other ranks own, and broadcast_from_rank0 would leave those "
            f"matrices restarting from zero. {_RESUME_PATHS}. Nothing was loaded on any rank.")
    for i, (p, _, _) in enumerate(entries):
        seen = [h.get(i) for _, _, h in every]  # on each rank
        what, o = f"the parameter of shape {tuple(p.shape)} (index {i})", owner.get(i)
        problem = None
        for r, h in enumerate(seen):
            if h == "mixed":
                problem = f"rank {r} holds both a state and an owner marker for {what}"
            elif o is None and h is not None:
                problem = f"rank {r} has an owner marker for {what}, which every rank steps on its own shard"
            elif h == "state" and r != o:
                problem = f"rank {r} holds the state of {what}, which rank {o} owns and steps on {world} ranks"
            elif isinstance(h, tuple) and h[1] != o:
                problem = f"rank {r}'s marker puts the state of {what} on rank {h[1]}, but rank {o} owns it on " \
                          f"{world} ranks"
            if problem:
                break
        if problem is None and o is not None and any(seen) and seen[o] != "state":
            problem = f"rank {o}, which owns {what} on {world} ranks, has no state for it"
        if problem:
            raise ValueError(
                f"{name}.load_state_dict under FSDP2: this state dict does not hold each low-rank state on the "
                f"rank that steps its matrix: {problem} (a state dict of another number of ranks, other param "
                f"groups, or another rank's). Resharding is not supported. {_RESUME_PATHS}. Nothing was loaded "
                "on any rank.")


def _load_state_dict(self, state_dict: dict) -> None:
    _check_owner_layout(self, state_dict)  # before anything is loaded, on every rank alike
    _load_state_dict_unchecked(self, state_dict)


_Base._fsdp2_step = fsdp2_step  # what _Base.step() calls for DTensor parameters
# _Base.load_state_dict becomes the core's after _check_owner_layout: owner markers
# exist only where this section runs, and the copied-out core stays as it is
_load_state_dict_unchecked = _Base.load_state_dict
_load_state_dict.__name__, _load_state_dict.__qualname__ = "load_state_dict", "_Base.load_state_dict"
_load_state_dict.__doc__ = _load_state_dict_unchecked.__doc__
_Base.load_state_dict = _load_state_dict


__all__ = [
    "GaLoreAdamW",
    "AdaptiveAdamW",
    "LDAdam",
    "Adapprox",
    "lowrank_groups",
    "layerwise_hooks",
    "state_bytes",
    "NonFiniteGradientError",
]
