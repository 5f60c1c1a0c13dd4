"""lowrank_adam: memory-efficient low-rank Adam optimizers in one file.

* ``GaLoreAdamW`` (Zhao et al. 2024, arXiv:2403.03507): Adam on the gradient
  projected onto its top-r singular subspace, refreshed every T steps.
* ``AdaptiveAdamW``: GaLore with one global rank budget split by gradient
  spectra, moments rotated into each new basis, and the residual.
* ``LDAdam`` (Robert et al., ICLR 2025, arXiv:2410.16103): a new subspace
  every step, projection-aware moments, generalized error feedback.
* ``Adapprox`` (Zhao et al. 2024, arXiv:2403.14958): Adam's second moment as
  a randomized low-rank factorization of adaptive rank.

Each class docstring is its paper's algorithm box; its ``_update`` (one step
of one matrix) follows the box line by line with the box's letters. Groups
without an integer ``rank`` get ``torch.optim.AdamW``'s update. Sections 1-2
are the core, then the shared pieces, one section per optimizer, and the
helpers; a class copied out with the core and the sections it uses works
alone, while FSDP2 and layer-wise steps need ``lowrank_engine.py``
(docs/DESIGN.md gives the conventions and the reasons). Requires torch >= 2.5
(tested with 2.13.0).

    from lowrank_adam import GaLoreAdamW, lowrank_groups
    opt = GaLoreAdamW(lowrank_groups(model, rank=128), lr=1e-2)
"""

from __future__ import annotations

import heapq
import math
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

# =============================================================================
# 1. Pure math shared by the optimizers
# =============================================================================


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra runs in: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


PROJ_TYPES = ("std", "reverse_std", "left", "right")


def oriented(p: Tensor, proj_type: str = "std") -> tuple[Tensor, bool]:
    """X, the gradient of the (m, n) matrix ``p`` oriented (s, l) in float32 or
    better, and whether X = Gᵀ: ``std`` compresses the short side (m >= n -> Gᵀ),
    ``reverse_std`` the long one, ``left`` the rows, ``right`` the columns,
    ``ldadam`` LDAdam's rule (Gᵀ when m > n: a square keeps its rows)."""
    m, n = p.shape
    transposed = {"std": m >= n, "reverse_std": m < n, "left": False, "right": True, "ldadam": m > n}[proj_type]
    return (p.grad.T if transposed else p.grad).to(torch.promote_types(p.dtype, torch.float32)), transposed


def gradient_spectrum(x: Tensor, rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Thin SVD ``x = U diag(S) Vᵀ`` in float32 or better: ``U[:, :rank]``
    (contiguous, so a checkpoint does not save all of U) and all of ``S``."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.shape[0] <= x.shape[1]:  # LAPACK is faster on the tall side: U of x is V of xᵀ
        _, s, vh = torch.linalg.svd(x.T, full_matrices=False)
        u = vh.T
    else:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return (u if rank is None else u[:, :rank].contiguous()), s


def orthonormalize(x: Tensor) -> Tensor:
    """Q of the thin QR of x in float32 or better (orthonormal even if x is not full-rank)."""
    return torch.linalg.qr(x.to(torch.promote_types(x.dtype, torch.float32)), mode="reduced").Q


def apply_update_(param: Tensor, D: Tensor, lr: float, weight_decay: float) -> None:
    """``W ← W (1 - lr·wd) - lr·D``, consuming the temporary D. Never written as
    ``param.add_(D, alpha=-lr)``: inductor (torch 2.13) fuses that with the
    matmul that made D and drops ``alpha``; a multiply and an add compile right."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(D.mul_(-lr))  # (for a bf16 W and a float32 D: W + D in float32, rounded once)


def stream_seed(seed: int, *counters: int) -> int:
    """Seed of one draw from the ``seed`` option and counters (a parameter's index, a
    step) alone, SplitMix64's finalizer over each: the same on every DDP rank."""
    x = seed
    for c in (0, *counters):
        x = (((x ^ c) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1  # 63 bits: any torch.Generator takes it


@torch.compiler.disable  # a host sync: under torch.compile a quiet graph break, not a warning
def _to_host(values: list) -> list:
    """Tensors among ``values`` as floats (0-d) or lists of floats, one transfer per device."""
    out = list(values)
    for device in {v.device for v in values if isinstance(v, Tensor)}:
        idx = [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.device == device]
        flat = torch.cat([values[i].reshape(-1) for i in idx]).tolist()
        for i in idx:
            n = values[i].numel()
            out[i], flat = (flat[:n] if values[i].dim() else flat[0]), flat[n:]
    return out


# =============================================================================
# 2. The shared optimizer: checks, dense AdamW, exact state dicts
# =============================================================================


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; raised before anything is modified."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_dtensor(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor: a weight sharded by FSDP2 (``fully_shard``)."""
    return hasattr(p, "device_mesh") and hasattr(p, "placements")


def _engine(needed: Optional[str] = "FSDP2 (DTensor) parameters"):
    """``lowrank_engine.py``, imported when needed (without it a class says so, never
    trains wrong); None where it is only wanted (``needed=None``) and missing."""
    try:
        import lowrank_engine
    except ImportError:
        if needed is None:
            return None
        raise RuntimeError(f"{needed}: lowrank_adam needs lowrank_engine.py, which is not importable here. Put "
                           "lowrank_engine.py next to this file, or train with DDP / ZeroRedundancyOptimizer") from None
    return lowrank_engine


def _refuse_flattened(p: Tensor) -> None:
    """FSDP1's 1-D shards (``_fsdp_flattened``) hold no matrix: a low-rank method would silently be AdamW."""
    _check(not getattr(p, "_fsdp_flattened", False), f"a parameter (now of shape {tuple(p.shape)}) is flattened into "
           "1-D shards by FullyShardedDataParallel (FSDP1); lowrank_adam needs each matrix whole: use "
           "DistributedDataParallel, ZeroRedundancyOptimizer (ZeRO-1) or FSDP2 (fully_shard)")


def _validate_adam(group: dict) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    _check(lr >= 0.0, f"Invalid learning rate: {lr}")
    _check(eps > 0.0, f"Invalid epsilon value: {eps}")
    _check(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
    _check(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")
    _check(wd >= 0.0, f"Invalid weight_decay value: {wd}")
    seed = group.get("seed", 0)
    _check(isinstance(seed, int) and not isinstance(seed, bool), f"Invalid seed: {seed!r}")


def _validate_rank(group: dict, optimizer: str, proj_types: Sequence[str] = ("std",)) -> None:
    """Checks of a group with an integer ``rank``; warns if it exceeds a matrix's min(m, n)."""
    rank = group["rank"]
    _check(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, f"Invalid rank: {rank}")
    _check(isinstance(gap := group.get("update_proj_gap", 1), int) and gap >= 1, f"Invalid update_proj_gap: {gap}")
    _check(group.get("proj_type", "std") in proj_types,
           f"Invalid proj_type: {group.get('proj_type')!r} (expected one of {sorted(proj_types)})")
    for p in group["params"]:
        _check(p.dim() == 2, f"Invalid parameter in a 'rank' group: shape {tuple(p.shape)} is not 2-D "
                             "(put 1-D and other tensors in a group without 'rank')")
    small = [p for p in group["params"] if min(p.shape) < rank]
    if small:
        warnings.warn(f"{optimizer}: rank {rank} exceeds min(m, n) = {min(small[0].shape)} of a parameter of shape "
                      f"{tuple(small[0].shape)}; using rank min(m, n) for such matrices", stacklevel=4)


def _validate_options(group: dict, choices: dict) -> None:
    """``choices``: option -> its allowed values (a tuple), or a test of its value."""
    for key, ok in choices.items():
        if key in group:
            good = group[key] in ok if isinstance(ok, tuple) else ok(group[key])
            hint = f" (expected one of {ok})" if isinstance(ok, tuple) else ""
            _check(good, f"Invalid {key}: {group[key]!r}{hint}")


class _Base(Optimizer):
    """The shared optimizer. A class implements ``_validate_group(group)`` (run
    before a group joins) and ``_update(p, state, group, index)`` (one step of one
    low-rank matrix), or ``_step_items(items)`` for a step that needs every
    matrix at once; ``_Base`` checks groups and gradients before anything
    changes, gives dense parameters AdamW, and loads state dicts exactly."""

    group_keys: tuple[str, ...] = ("rank",)  # options besides the constructor's
    _bookkeeping_keys = ("params", "param_names", "differentiable",  # torch's, and its LR schedulers'
                         "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
    _dense_elementwise = True  # the dense update is elementwise (FSDP2 may step a shard of it)
    _rank_converts = False  # a group's rank may go between an integer and None (Adapprox converts V)
    _rank_fixed = False  # a matrix keeps its first rank (LDAdam tracks one subspace)

    def add_param_group(self, param_group: dict) -> None:
        # A copy: torch writes the defaults into the dict, which a second optimizer would inherit.
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be an ordered collection (a list), not a set")
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, tensor) pairs too
        for p in tensors:
            if isinstance(p, Tensor):
                _check(not torch.is_complex(p), f"Complex parameters are not supported (shape {tuple(p.shape)})")
                _refuse_flattened(p)
        options = set(self.defaults) | set(self.group_keys)
        for key in param_group:
            if key not in options and key not in self._bookkeeping_keys:  # the engine says whose option it is
                hint = engine.option_hint(self, key) if (engine := _engine(None)) else ""
                raise ValueError(f"{type(self).__name__} has no group option {key!r}{hint}. "
                                 f"Its group options: {', '.join(sorted(options))}")
        self._validate_group({**self.defaults, **param_group, "params": tensors})  # before it joins
        super().add_param_group(param_group)
        self.__dict__.pop("_where", None)  # the engine's step_parameter lookup table is stale

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        items = [(p, g, i) for i, (p, g) in enumerate((p, g) for g in self.param_groups for p in g["params"])
                 if p.grad is not None]
        if any(hasattr(p, "device_mesh") for p, _, _ in items):  # DTensors: FSDP2's sharded weights
            _engine().fsdp2_step(self, items)
        elif items:
            self._check_grads(items)
            self._step_items(items)
        return loss

    def step_parameter(self, p: Tensor) -> None:
        """Update the one parameter ``p`` now, exactly as ``step()`` would, for
        layer-wise training (``lowrank_engine.layerwise_hooks``, which it needs)."""
        _engine("layer-wise steps (step_parameter)").step_parameter(self, p)

    def _step_items(self, items: list[tuple[Tensor, dict, int]], peers=None) -> None:
        """One step of the (parameter, group, index) triples: AdamW for the dense groups,
        ``_update`` for each low-rank matrix. ``peers``: FSDP2's collectives (AdaptiveAdamW)."""
        dense = [(p, g) for p, g, _ in items if g.get("rank") is None]
        if dense:
            self._adamw(dense)
        for p, group, index in items:
            if group.get("rank") is not None:
                self._update(p, self.state[p], group, index)

    def _update(self, p: Tensor, state: dict, group: dict, index: int) -> None:
        raise NotImplementedError

    def _check_grads(self, items: list[tuple[Tensor, dict, int]]) -> None:
        """Raise, before any state or parameter changes, on a sparse, complex or
        non-finite gradient, or a state that its group's rank no longer fits. One host
        sync per device and call (Σ g is NaN/Inf when g holds one)."""
        sums: dict[torch.device, list[Tensor]] = {}
        for p, group, _ in items:
            if getattr(p, "_fsdp_flattened", False):  # wrapped by FSDP1 after the optimizer was built
                _refuse_flattened(p)
            state, rank = self.state.get(p, {}), group.get("rank")
            kind = ("P" in state or "exp_avg" in state) and ("P" in state) != (rank is not None)  # int <-> None
            if (kind and not self._rank_converts) or (self._rank_fixed and "P" in state and rank is not None
                                                      and state["rank"] != min(rank, *p.shape)):
                self._refuse_rank_change(p, state, rank)
            if p.grad.is_sparse or torch.is_complex(p.grad):
                kind = "sparse" if p.grad.is_sparse else "complex"
                raise RuntimeError(f"{type(self).__name__} does not support {kind} gradients "
                                   f"(parameter of shape {tuple(p.shape)})")
            if group["check_finite"]:
                sums.setdefault(p.grad.device, []).append(p.grad.sum(dtype=torch.float32))
        if sums and not all(_to_host([torch.stack(s).isfinite().all() for s in sums.values()])):
            self._refuse_non_finite(items)

    def _refuse_non_finite(self, items: list[tuple[Tensor, dict, int]]) -> None:
        """Name the parameter whose gradient holds NaN or Inf (none: a sum of huge
        finite values overflowed, and the step goes on)."""
        for p, group, _ in items:
            if group["check_finite"] and not bool(torch.isfinite(p.grad).all()):
                step = self.state[p].get("step", 0) + 1 if p in self.state else 1
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient (NaN or Inf) for the parameter of shape "
                    f"{tuple(p.shape)} at its step {step}; this call updated nothing. "
                    "Lower the learning rate, clip gradients, or use a GradScaler for fp16.")

    def _refuse_rank_change(self, p: Tensor, state: dict, rank: Optional[int]) -> None:
        """A group's ``rank`` went between an integer and None after its matrices took
        steps, or changed at all where a matrix keeps its first rank (``_rank_fixed``)."""
        was, now = ("an integer", "None") if "P" in state else ("None", rank)
        why = "its state cannot be carried over"
        if "P" in state and rank is not None:
            was, now, why = state["rank"], rank, "its subspace is tracked from step to step at one rank"
        raise ValueError(f"{type(self).__name__}: the rank of the group of a parameter of shape {tuple(p.shape)} "
                         f"changed from {was} to {now} after it took steps; {why} (nothing was changed). Set the "
                         "rank back, or give the parameter to a new optimizer")

    def _adamw(self, dense: list[tuple[Tensor, dict]]) -> None:
        """``torch.optim.AdamW``'s update, operation for operation, with its multi-tensor
        kernels (one call per operation, group and device); float32 moments for
        bf16/fp16 parameters, the update rounded once into the parameter."""
        batches: dict[tuple[int, torch.device], list[Tensor]] = {}
        for p, group in dense:
            state = self.state[p]
            if len(state) == 0:  # m, v
                state.update(step=0, exp_avg=torch.zeros_like(p, dtype=linalg_dtype(p.dtype)),
                             exp_avg_sq=torch.zeros_like(p, dtype=linalg_dtype(p.dtype)))
            state["step"] += 1
            batches.setdefault((id(group), p.device), []).append(p)
        groups = {id(g): g for _, g in dense}
        for (gid, _), ps in batches.items():
            (beta1, beta2), lr, wd = groups[gid]["betas"], groups[gid]["lr"], groups[gid]["weight_decay"]
            m, v = [self.state[p]["exp_avg"] for p in ps], [self.state[p]["exp_avg_sq"] for p in ps]
            steps = [self.state[p]["step"] for p in ps]
            grads = [p.grad.to(mi.dtype) for p, mi in zip(ps, m)]
            if wd != 0:  # W ← W (1 - lr·wd)
                torch._foreach_mul_(ps, 1 - lr * wd)
            # m ← β1 m + (1-β1) g ;  v ← β2 v + (1-β2) g²
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            # W ← W - lr/(1-β1ᵗ) · m / (sqrt(v)/sqrt(1-β2ᵗ) + ε)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
            torch._foreach_add_(denom, groups[gid]["eps"])
            size = [-lr / (1 - beta1**t) for t in steps]
            same = [i for i, p in enumerate(ps) if p.dtype == m[i].dtype]
            if same:
                torch._foreach_addcdiv_([ps[i] for i in same], [m[i] for i in same], [denom[i] for i in same],
                                        [size[i] for i in same])
            for i in (i for i in range(len(ps)) if i not in same):  # bf16 weights, float32 moments
                ps[i].add_((m[i] / denom[i]).mul_(size[i]))  # W + update in float32, rounded once into W

    def state_dict(self) -> dict:
        """``Optimizer.state_dict``; a full one under FSDP2 holds every matrix's state (see the engine)."""
        sharded = any(is_dtensor(p) for g in self.param_groups for p in g["params"])
        return _engine().full_state(self, super().state_dict()) if sharded else super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, with every floating state tensor back in its
        saved dtype (torch's casts it to the parameter's, rounding a bf16 model's
        float32 state), and another optimizer's state dict refused before any load."""
        if engine := _engine(None):  # where importable: older state dicts read, and who wrote another's
            state_dict = engine.check_state_dict(self, state_dict)
        foreign, cls = ({k for g in state_dict["param_groups"] for k in g} - set(self.defaults)
                        - set(self.group_keys) - set(self._bookkeeping_keys)), type(self).__name__
        _check(not foreign, f"{cls}.load_state_dict: this state dict was written by another optimizer (its param "
                            f"groups hold {', '.join(sorted(foreign))}, which {cls} does not have); nothing was loaded")
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]) or any(
                isinstance(s, dict) and "owner" in s for s in state_dict["state"].values()):
            state_dict = _engine().place_state(self, state_dict)  # FSDP2: each matrix's state on its owner rank
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # an option added since the state dict was written: its default
            group.update({k: v for k, v in self.defaults.items() if k not in group and k not in self._bookkeeping_keys})
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, [p for g in self.param_groups for p in g["params"]]):
            for name, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():  # contiguous, as the step keeps it
                    self.state[p][name] = value.to(device=p.device).contiguous()

    def ranks(self) -> list[int]:
        """Current rank of each low-rank parameter, in param-group order."""
        return [self.state.get(p, {}).get("rank", min(g["rank"], *p.shape))
                for g in self.param_groups if g.get("rank") is not None for p in g["params"]]


# =============================================================================
# 3. Subspace pieces shared by GaLoreAdamW and AdaptiveAdamW
# =============================================================================


def align_signs_(u: Tensor, prev: Tensor) -> Tensor:
    """Flip columns of ``u`` in place to agree in sign with those of ``prev``: moments
    left in place are coordinates in the basis, and a singular vector's sign is arbitrary."""
    j = min(u.shape[1], prev.shape[1])
    agree = (u[:, :j] * prev[:, :j].to(u.dtype)).sum(dim=0)
    u[:, :j] *= torch.where(agree < 0, -1.0, 1.0).to(u.dtype)
    return u


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, for one draw."""
    return torch.Generator(device=device).manual_seed(seed)


SUBSPACES = ("svd", "random", "gha")
SUBSPACE_OPTIONS = {  # group options of GaLoreAdamW's variants, and their valid values
    "scale": lambda v: v > 0, "norm_growth_limit": lambda v: v is None or v >= 1.0, "subspace": SUBSPACES,
    "refresh": ("svd", "randomized"), "gha_lr": lambda v: 0.0 < v <= 1.0, "stagger": lambda v: isinstance(v, bool),
    "refresh_iters": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1}


def refresh_due(t: int, index: int, group: dict) -> bool:
    """Whether matrix ``index`` takes a new basis at its step t: t = 1, then at t ≡ 1
    (mod T = ``update_proj_gap``), or with ``stagger`` at t ≡ 1 + (index mod T)."""
    gap = group["update_proj_gap"]
    return t == 1 or (t - 1 - (index % gap if group.get("stagger") else 0)) % gap == 0


REFRESH_OVERSAMPLE = 8  # extra sketch columns of refresh="randomized"


def randomized_spectrum(x: Tensor, width: int, warm: Optional[Tensor], generator: torch.Generator,
                        power_iters: int = 1) -> tuple[Tensor, Tensor]:
    """Leading left singular vectors and values of x from a range finder
    warm-started at the previous basis (Halko, Martinsson and Tropp 2011)::

        Q ← [P_prev, Ω]                 s×k, topped up with Gaussian columns to k = width
        Q ← orth(X (Xᵀ Q))              ``power_iters`` times
        B ← Qᵀ X = U_B diag(S) V_Bᵀ      (through the QR of Bᵀ: a k×k SVD)
        U ← Q U_B                       signed like P_prev (``align_signs_``)

    About 2·(power_iters + 1)·s·l·k multiply-adds where the SVD costs s²·l;
    the values never exceed X's, and the basis is exact when rank(X) <= k.
    """
    x = x.to(linalg_dtype(x.dtype))
    k = min(width, x.shape[0])
    columns = [] if warm is None else [warm[:, :k].to(x.dtype)]
    missing = k - (0 if warm is None else columns[0].shape[1])
    if missing > 0:
        columns.append(torch.randn(x.shape[0], missing, generator=generator, device=generator.device, dtype=x.dtype))
    q = torch.cat(columns, dim=1) if power_iters > 0 else orthonormalize(torch.cat(columns, dim=1))
    for _ in range(power_iters):
        y = x.T @ q  # rescaled so that X Y cannot overflow where X Xᵀ would
        q = orthonormalize(x @ y.div_(y.abs().amax().clamp_min(torch.finfo(y.dtype).tiny)))
    u_b, s, _ = torch.linalg.svd(torch.linalg.qr((q.T @ x).T, mode="r").R.T)
    u = q @ u_b
    if warm is not None:
        align_signs_(u, warm)
    return u.contiguous(), s


def transform_moments(P_new: Tensor, P_old: Tensor, M: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's moments from basis P_old into P_new: ``C = P_newᵀ P_old``, ``M ← C M``,
    ``V ← (C∘C) V`` (our reading for V: it fits differing ranks and keeps V >= 0)."""
    C = P_new.T @ P_old
    return C @ M, (C * C) @ V


def resize_rows(x: Tensor, rows: int) -> Tensor:
    """First ``rows`` rows of x, zero-padded when x has fewer (a rank changed)."""
    out = x.new_zeros(rows, x.shape[1])
    k = min(rows, x.shape[0])
    out[:k] = x[:k]
    return out


def orthogonal_residual(X: Tensor, P: Tensor, R: Tensor, N: Tensor, transposed: bool = False) -> Tensor:
    """Fira's residual, what the subspace drops scaled like the Adam update, in W's
    layout: ``S = (X - P R) diag(φ)``, ``φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + δ)``, with our
    scale-free guard ``δ = 1e-8 ‖X‖_F / sqrt(l)`` (φ = 0 for X = 0)."""
    guard = torch.linalg.vector_norm(X) * (1e-8 / math.sqrt(max(X.shape[1], 1)))
    denom = torch.linalg.vector_norm(R, dim=0) + guard
    phi = torch.where(denom > 0, torch.linalg.vector_norm(N, dim=0) / denom, 0.0)
    if transposed:
        return torch.addmm(X.T, R.T, P.T, alpha=-1).mul_(phi[:, None])  # Sᵀ: (l, s)
    return torch.addmm(X, P, R, alpha=-1).mul_(phi)  # S: (s, l)


def norm_growth_limit_(x: Tensor, prev_rms: Tensor, gamma: float) -> Tensor:
    """``x ← x · min(1, γ·prev_rms / RMS(x))`` in place; returns the new history, RMS(x) (our choice:
    ``prev_rms`` for an all-zero x, so a zero gradient keeps it). ``prev_rms`` 0 (none yet) limits nothing."""
    cur = torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))
    factor = torch.where((prev_rms > 0) & (cur > gamma * prev_rms), gamma * prev_rms / cur.clamp_min(1e-30), 1.0)
    x.mul_(factor)
    return torch.where(cur > 0, cur * factor, prev_rms)


# =============================================================================
# 4. GaLoreAdamW: uniform-rank gradient projection (the baseline)
# =============================================================================


class GaLoreAdamW(_Base):
    r"""AdamW with GaLore gradient low-rank projection (Zhao et al. 2024).

    For each matrix of a group with an integer ``rank``, with its gradient in
    oriented form X (s×l, s = min(m, n) by ``proj_type``) and T = ``update_proj_gap``::

        if t ≡ 1 (mod T):  P ← top-r left singular vectors of X     (SVD)
        R ← Pᵀ X                                     project: r×l
        M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R²   Adam in the subspace
        N ← M̂ / (sqrt(V̂) + ε)                        (M̂ = M/(1-β1ᵗ), V̂ = V/(1-β2ᵗ))
        W ← W (1 - lr·wd) - lr · α P N               project back, scale α

    Every other parameter gets AdamW. The moments stay in place when P
    changes (GaLore's choice), so each new column of P is signed like the old
    one (``align_signs_``). Group options: ``rank``, ``update_proj_gap`` T
    (200), ``scale`` α (0.25), ``proj_type`` (std, reverse_std, left, right).
    State per matrix: P (s×r), M and V (r×l), not AdamW's 2·m·n numbers::

        opt = GaLoreAdamW(lowrank_groups(model, rank=128, update_proj_gap=200), lr=1e-2)

    Variants, each a small piece below the step that the plain path skips:

    * ``residual=True`` (Fira): ``D ← α P N + S``, S the part of X the subspace
      drops (``orthogonal_residual``), its RMS growth per step capped at
      ``norm_growth_limit`` γ (1.01).
    * ``refresh="randomized"``: P from ``randomized_spectrum``, a sketch warm-started
      at the previous P (``refresh_iters`` iterations), in place of the exact SVD.
    * ``subspace="random"`` (a random P at each refresh) or ``"gha"`` (P tracked
      every step by Sanger's rule, ``gha_step``, ``gha_lr``): the moments
      follow P at each refresh (``transform_moments``).
    * ``stagger=True``: the matrices refresh at different steps (``refresh_due``).

    A refresh that meets an all-zero X keeps P and is redone at the next
    step; a changed group ``rank`` takes effect at the next refresh.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", residual: bool = False, norm_growth_limit: Optional[float] = 1.01,
                 subspace: str = "svd", refresh: str = "svd", refresh_iters: int = 1, gha_lr: float = 0.5,
                 stagger: bool = False, seed: int = 0, check_finite: bool = True):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap, scale=scale,
            proj_type=proj_type, residual=residual, norm_growth_limit=norm_growth_limit, subspace=subspace,
            refresh=refresh, refresh_iters=refresh_iters, gha_lr=gha_lr, stagger=stagger, seed=seed,
            check_finite=check_finite))

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        if group.get("rank") is not None:
            _validate_rank(group, type(self).__name__, PROJ_TYPES)
        _validate_options(group, SUBSPACE_OPTIONS)

    def _update(self, p: Tensor, state: dict, group: dict, index: int) -> None:
        """One GaLore step of one matrix: the box above, line by line."""
        (beta1, beta2), t = group["betas"], state.get("step", 0) + 1
        X, transposed = oriented(p, group["proj_type"])  # X: (s, l)
        # if t ≡ 1 (mod T):  P ← top-r left singular vectors of X
        if refresh_due(t, index, group) or state.get("refresh_again"):
            self._refresh(p, X, state, group, index, t)
        P = state["P"]
        if "exp_avg" not in state:  # M, V: (r, l)
            state.update(exp_avg=X.new_zeros(P.shape[1], X.shape[1]), exp_avg_sq=X.new_zeros(P.shape[1], X.shape[1]))
        M, V = state["exp_avg"], state["exp_avg_sq"]
        # R ← Pᵀ X
        R = P.T @ X
        # M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R² ;  N ← M̂ / (sqrt(V̂) + ε)
        M.lerp_(R, 1 - beta1)
        V.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        N = (M / (1 - beta1**t)).div_((V.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"]))
        # D ← α P N, made in W's layout (Nᵀ Pᵀ when X = Gᵀ: no strided full-size copy)
        if group["residual"]:  # D ← α P N + S
            S = self._residual(X, P, R, N, state, group, transposed)
            D = S.addmm_(*((N.T, P.T) if transposed else (P, N)), alpha=group["scale"])
        else:
            N.mul_(group["scale"])
            D = N.T @ P.T if transposed else P @ N
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, D, group["lr"], group["weight_decay"])
        state["step"] = t
        if group["subspace"] == "gha":  # P ← orth(P + η (C P - P triu(Pᵀ C P))), for the next step
            state["P"] = orthonormalize_signed(gha_step(P, X, R, group["gha_lr"]))

    def _refresh(self, p: Tensor, X: Tensor, state: dict, group: dict, index: int, t: int) -> None:
        """P ← a new basis of rank r = min(rank, m, n). An all-zero X has none: P is kept
        (coordinate axes at first) and the refresh redone at the next step (``refresh_again``)."""
        r, P_old = min(group["rank"], *p.shape), state.get("P")
        retry, state["refresh_again"] = state.get("refresh_again", 0), 0
        if group["subspace"] == "svd" and group["refresh"] == "svd":  # (None: an all-zero X)
            P_new = None if group["check_finite"] and is_all_zero(X) else gradient_spectrum(X, r)[0]
        else:
            P_new = self._variant_basis(p, X, state, group, index, t, r, retry)
        if P_new is None:
            state["refresh_again"] = 1
            if P_old is None:  # coordinate axes (GHA: also the basis the moments are in, as after any refresh)
                state["P"], state["rank"] = torch.eye(X.shape[0], r, dtype=X.dtype, device=X.device), r
                if group["subspace"] == "gha":
                    state["P_ref"] = state["P"]
            return
        if P_old is not None:
            if group["subspace"] != "random":  # each column signed like P_old's (``align_signs_``)
                align_signs_(P_new, P_old)
            if "exp_avg" in state and group["subspace"] != "svd":  # the moments follow P: M ← C M, V ← (C∘C) V
                P_from = state.get("P_ref", P_old) if group["subspace"] == "gha" else P_old
                state["exp_avg"], state["exp_avg_sq"] = transform_moments(
                    P_new, P_from, state["exp_avg"], state["exp_avg_sq"])
            elif "exp_avg" in state and r != state["exp_avg"].shape[0]:  # a changed rank: first rows kept
                state["exp_avg"], state["exp_avg_sq"] = resize_rows(state["exp_avg"], r), resize_rows(
                    state["exp_avg_sq"], r)
        state["P"], state["rank"] = P_new, r
        state.pop("P_ref", None)
        if group["subspace"] == "gha":  # the basis the moments are in, until the next refresh
            state["P_ref"] = P_new

    def _variant_basis(self, p: Tensor, X: Tensor, state: dict, group: dict, index: int, t: int, r: int,
                       retry: int) -> Optional[Tensor]:
        """P_new for ``subspace`` "random" or "gha", or ``refresh="randomized"``;
        None for an all-zero X."""
        if group["subspace"] == "random" or group["refresh"] == "randomized":
            state.setdefault("seed", stream_seed(group["seed"], index))  # Ω at step t: stream_seed(this, t)
        if group["subspace"] == "random":  # P ← orth(Ω), Ω ~ N(0, 1) of shape s×r
            return random_basis(X.shape[0], r, _generator(p.device, stream_seed(state["seed"], t)), X.dtype)
        if group["subspace"] == "gha" and "P" in state and not retry and state["P"].shape[1] == r:
            return state["P"]  # where Sanger's rule has taken P since the last refresh
        if group["check_finite"] and is_all_zero(X):
            return None
        if group["refresh"] == "randomized" and "P" in state:
            U, _ = randomized_spectrum(X, r + REFRESH_OVERSAMPLE, state["P"],
                                       _generator(p.device, stream_seed(state["seed"], t)), group["refresh_iters"])
            return U[:, :r].contiguous()
        return gradient_spectrum(X, r)[0]

    def _residual(self, X: Tensor, P: Tensor, R: Tensor, N: Tensor, state: dict, group: dict,
                  transposed: bool) -> Tensor:
        """S ← (X - P R) diag(φ), its RMS growth capped at γ per step (Fira)."""
        S = orthogonal_residual(X, P, R, N, transposed)
        if "rms" not in state:  # RMS of the last S (0: no history)
            state["rms"] = X.new_zeros(())
        if group["norm_growth_limit"] is not None:
            state["rms"] = norm_growth_limit_(S, state["rms"], group["norm_growth_limit"])
        return S


@torch.compiler.disable  # a host sync: under torch.compile a quiet graph break, not a warning
def is_all_zero(x: Tensor) -> bool:
    return not bool(x.any())


def random_basis(s: int, r: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A uniformly random r-dimensional subspace of R^s (Haar-distributed basis)."""
    return orthonormalize_signed(torch.randn(s, r, generator=generator, device=generator.device, dtype=dtype))


def orthonormalize_signed(x: Tensor) -> Tensor:
    """Q of the thin QR of x with diag(R) >= 0, Haar-distributed for a Gaussian x
    (Mezzadri 2007); contiguous, as a loaded checkpoint holds it."""
    q, r = torch.linalg.qr(x.to(linalg_dtype(x.dtype)), mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    return (q * torch.where(sign == 0, torch.ones_like(sign), sign)).contiguous()


def gha_step(P: Tensor, X: Tensor, R: Tensor, lr: float) -> Tensor:
    """One step of Sanger's rule towards the leading eigenvectors (as many as P has columns)
    of ``C = X Xᵀ / ‖X‖²_F``: ``P ← P + η (C P - P triu(Pᵀ C P))``, with ``C P = X Rᵀ/‖X‖²``
    and ``Pᵀ C P = R Rᵀ/‖X‖²`` (R = Pᵀ X; our ‖X‖² makes η scale-free). A zero gradient
    leaves P unchanged."""
    energy = torch.linalg.vector_norm(X).square().clamp_min(1e-30)
    cp = (R @ X.T).T  # X Rᵀ, with X on the right (a fast skinny product)
    return P + (cp - P @ torch.triu(R @ R.T)) * (lr / energy)


# =============================================================================
# 5. AdaptiveAdamW: a global rank budget split by gradient spectra
# =============================================================================


# Score of giving a matrix rank r+1, from its singular values s (descending; s[r]
# is the (r+1)-th) at its rank r >= 1, with E = Σ sᵢ² its gradient's energy (a
# zero-gradient matrix scores 0, never NaN).
RANK_METRICS: dict[str, Callable[[list[float], int, float], float]] = {
    "explained_variance": lambda s, r, E: s[r] ** 2 / E if E > 0 else 0.0,  # the share the next direction explains
    "singular_value": lambda s, r, E: s[r] ** 2,  # raw energy: favours large gradients
    "conditioning": lambda s, r, E: s[r] / s[0] if s[0] > 0 else 0.0,  # s_{r+1}/s_1
    "gap": lambda s, r, E: s[r] / s[r - 1] if s[r - 1] > 0 else 0.0,  # s_{r+1}/s_r
    "combined": lambda s, r, E: 0.5 * (s[r] ** 2 / E if E > 0 else 0.0) + 0.5 * (s[r] / s[0] if s[0] > 0 else 0.0),
    "uniform_variance": lambda s, r, E: -sum(v * v for v in s[:r]) / E if E > 0 else 0.0,  # helps the least-covered
}


@torch.compiler.disable  # host numbers: nothing for torch.compile to trace
def allocate_ranks(spectra: Sequence, budget: int, caps: Optional[Sequence[int]] = None,
                   metric: str = "explained_variance", energies: Optional[Sequence] = None) -> list[int]:
    """Greedy allocation: rank 1 each; then, while budget is left, one more to the
    matrix whose next singular value scores highest under ``metric`` (ties: the lower
    index), up to its cap (default: its number of values). ``spectra`` and ``energies``
    (E = ‖X‖²_F, for truncated spectra) may be tensors: one transfer per device."""
    if metric not in RANK_METRICS:
        raise ValueError(f"Invalid rank metric: {metric!r} (expected one of {sorted(RANK_METRICS)})")
    score, n = RANK_METRICS[metric], len(spectra)
    host = _to_host(list(spectra) + list(energies if energies is not None else []))  # one sync per device
    spectra = [[float(v) for v in s] for s in host[:n]]
    caps = [len(s) for s in spectra] if caps is None else [min(int(c), len(s)) for c, s in zip(caps, spectra)]
    if any(c < 1 for c in caps):
        raise ValueError("every matrix needs at least one singular value")
    energy = [sum(v * v for v in s) for s in spectra] if energies is None else [float(e) for e in host[n:]]
    ranks = [1] * len(spectra)
    heap = [(-score(s, 1, e), i) for i, (s, e, c) in enumerate(zip(spectra, energy, caps)) if c > 1]
    heapq.heapify(heap)
    for _ in range(min(budget, sum(caps)) - len(spectra)):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-score(spectra[i], ranks[i], energy[i]), i))
    return ranks


class AdaptiveAdamW(_Base):
    r"""GaLore with a global rank budget allocated from gradient spectra.

    A group's ``rank`` is the *average* rank per matrix: the matrices of all
    allocating groups share B = Σ rank (each clamped to min(m, n)). At steps
    1, T+1, 2T+1, … the matrices refresh together::

        X_i = U_i diag(s_i) V_iᵀ            one thin SVD per matrix
        r_i ← allocate_ranks(s, B)           rank 1 each, then greedily the best
                                             next singular value (``rank_metric``)
        P_i ← U_i[:, :r_i]
        C_i = P_newᵀ P_old ;  M ← C M ;  V ← (C∘C) V     (momentum transformation)

    and every step, as GaLore plus the out-of-subspace residual S::

        R ← Pᵀ X ;  M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R²
        N ← M̂ / (sqrt(V̂) + ε)
        S ← (X - P R) diag(φ),  φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + δ)
        S ← S · min(1, γ·RMS_{t-1} / RMS(S))              (norm-growth limiter)
        W ← W (1 - lr·wd) - lr · (α P N + S)

    With ``residual=False`` there is no S and the limiter acts on N (the source
    leaves open what it caps; with the residual the loss is lower, docs/DESIGN.md).

    Group options as GaLoreAdamW's (no ``subspace``: the allocation needs
    singular values), plus ``rank_metric`` (one of ``RANK_METRICS``, the same
    in every allocating group), ``allocate`` (True; False keeps the group's
    rank, outside the budget), ``transform_momentum`` (True) and
    ``refresh_keep`` (2.0: at most ⌈refresh_keep·rank⌉ singular vectors per
    matrix are held until the allocation is known; None keeps all). A matrix
    whose X is all-zero at its refresh keeps P and rank and refreshes at the
    next step. With ``stagger`` the allocation stays global: a matrix not due
    takes part with the spectrum of its last refresh, and drops its last
    directions at once if allocated less. ``ranks()`` is the allocation::

        opt = AdaptiveAdamW(lowrank_groups(model, rank=8, update_proj_gap=200), lr=1e-2)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", rank_metric: str = "explained_variance", allocate: bool = True,
                 transform_momentum: bool = True, norm_growth_limit: Optional[float] = 1.01,
                 residual: bool = True, refresh_keep: Optional[float] = 2.0, refresh: str = "svd",
                 refresh_iters: int = 1, stagger: bool = False, seed: int = 0, check_finite: bool = True):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap, scale=scale,
            proj_type=proj_type, residual=residual, norm_growth_limit=norm_growth_limit, check_finite=check_finite,
            rank_metric=rank_metric, allocate=allocate, transform_momentum=transform_momentum,
            refresh_keep=refresh_keep, refresh=refresh, refresh_iters=refresh_iters, stagger=stagger, seed=seed))

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        if group.get("rank") is None:
            return
        _validate_rank(group, type(self).__name__, PROJ_TYPES)
        _validate_options(group, {**SUBSPACE_OPTIONS, "refresh_keep": lambda v: v is None or v > 0,
                                  "rank_metric": tuple(RANK_METRICS)})
        # one greedy allocation compares the scores of all allocating matrices, on one schedule
        for key in ("rank_metric", "stagger"):
            others = {g[key] for g in self.param_groups if g.get("rank") is not None and g["allocate"]}
            _check(not group["allocate"] or others <= {group[key]},
                   f"Invalid {key}: {group[key]!r} differs from {sorted(others)} of another group; every group that "
                   f"allocates shares one budget and must use the same {key} (or set allocate=False in one of them)")

    @torch.compiler.disable(recursive=False)  # bookkeeping runs eager; the arithmetic it calls compiles
    def _step_items(self, items: list[tuple[Tensor, dict, int]], peers=None) -> None:
        """The refresh half of the box for every matrix due, then ``_update`` and AdamW.
        ``peers``: FSDP2's sums and gathers, so every rank allocates as one process."""
        st = self.state
        due = [(p, g, i) for p, g, i in items if g.get("rank") is not None and (
            refresh_due(st[p].get("step", 0) + 1, i, g) or st[p].get("refresh_again"))]
        if due or peers:
            # 0. E = ‖X‖²_F of each matrix (one host sync); an all-zero X keeps P and rank (``_hold``)
            E = [torch.linalg.vector_norm(p.grad, dtype=torch.promote_types(p.dtype, torch.float32)).square()
                 for p, _, _ in due]
            zero = [e == 0.0 for e in _to_host(E)]
            if any(zero):
                due, E = self._hold(due, E, zero)
            # B: the allocating matrices' ranks (each clamped to min(m, n)), less what those not refreshed hold
            held = [(p, g, i) for p, g, i in items if g.get("rank") is not None and g["allocate"]]
            stored = self._stored(held, due) if any(g["stagger"] for _, g, _ in held) else []
            pool, now = [k for k, (_, g, _) in enumerate(due) if g["allocate"]], {id(p) for p, _, _ in due + stored}
            budget = sum(min(g["rank"], *p.shape) - (0 if id(p) in now else st[p].get("rank", 0)) for p, g, _ in held)
            totals = [budget, len(pool) + len(stored), len(due)]
            budget, pooled, due_anywhere = peers.sum(totals) if peers else totals
        if (due or peers) and due_anywhere:
            # 1. X = U diag(s) Vᵀ: of U, what an allocation may use (at most ⌈refresh_keep·rank⌉ and B - L + 1)
            ranks = [min(g["rank"], *p.shape) if "rank" not in st[p] or not g["allocate"] else st[p]["rank"]
                     for p, g, _ in due]
            svds = []
            for k, (p, g, i) in enumerate(due):
                keep = ranks[k] if k not in pool else budget - pooled + 1 if g["refresh_keep"] is None else min(
                    budget - pooled + 1, max(ranks[k], math.ceil(g["refresh_keep"] * g["rank"])))
                st[p]["refresh_again"] = 0
                svds.append(self._randomized(p, st[p], g, i, keep) if g["refresh"] == "randomized" else
                            gradient_spectrum(oriented(p, g["proj_type"])[0], keep))
            # 2. r ← allocate_ranks(s, B): rank 1 each, then greedily the best next singular value
            if pooled:
                records = [(due[k][2], svds[k][1], E[k], min(due[k][0].shape), due[k][1]["rank_metric"]) for k in pool]
                records += [(i, st[p]["spectrum"], st[p]["energy"].reshape(()), min(p.shape), g["rank_metric"])
                            for p, g, i in stored]
                index, spectra, energy, caps, metric = zip(*(peers.gather(records) if peers else records))
                allocated = dict(zip(index, allocate_ranks(spectra, budget, caps, metric[0], energy)))
                for k in pool:
                    ranks[k] = allocated[due[k][2]]
                if stored or (pool and due[pool[0]][1]["stagger"]):
                    self._keep_spectra(due, pool, svds, E, stored, allocated)
            # 3. P ← U[:, :r] ;  4. C = P_newᵀ P_old ;  M ← C M ;  V ← (C∘C) V
            for (p, g, _), (U, _), r in zip(due, svds, ranks):
                s = st[p]
                P = U[:, :r].contiguous() if r <= U.shape[1] else gradient_spectrum(  # allocated more than held
                    oriented(p, g["proj_type"])[0], r)[0]
                if "P" in s:
                    align_signs_(P, s["P"])  # each column signed like P_old's
                    if "exp_avg" in s and g["transform_momentum"]:
                        s["exp_avg"], s["exp_avg_sq"] = transform_moments(P, s["P"], s["exp_avg"], s["exp_avg_sq"])
                    elif "exp_avg" in s and r != s["rank"]:  # no transformation: the first rows kept
                        s["exp_avg"], s["exp_avg_sq"] = resize_rows(s["exp_avg"], r), resize_rows(s["exp_avg_sq"], r)
                s["P"], s["rank"] = P, r
        # every step: projected Adam with the residual; AdamW for the dense parameters
        for p, g, i in items:
            if g.get("rank") is not None:
                self._update(p, st[p], g, i)
        dense = [(p, g) for p, g, _ in items if g.get("rank") is None]
        if dense:
            self._adamw(dense)

    def _update(self, p: Tensor, state: dict, group: dict, index: int) -> None:
        """The every-step half of the box, for one matrix."""
        (beta1, beta2), t = group["betas"], state.get("step", 0) + 1
        X, transposed = oriented(p, group["proj_type"])  # X: (s, l)
        P, gamma = state["P"], group["norm_growth_limit"]  # P: (s, r), r this matrix's allocated rank
        if "exp_avg" not in state:  # M, V: (r, l)
            state.update(exp_avg=X.new_zeros(P.shape[1], X.shape[1]), exp_avg_sq=X.new_zeros(P.shape[1], X.shape[1]))
        if "rms" not in state:
            state["rms"] = X.new_zeros(())  # RMS of the last limited update (0: no history)
        M, V = state["exp_avg"], state["exp_avg_sq"]
        # R ← Pᵀ X
        R = P.T @ X
        # M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R² ;  N ← M̂ / (sqrt(V̂) + ε)
        M.lerp_(R, 1 - beta1)
        V.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        N = (M / (1 - beta1**t)).div_((V.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"]))
        if group["residual"]:
            # S ← (X - P R) diag(φ) ;  S ← S · min(1, γ·RMS_{t-1}/RMS(S)) ;  D ← α P N + S   (in W's layout)
            S = orthogonal_residual(X, P, R, N, transposed)
            if gamma is not None:
                state["rms"] = norm_growth_limit_(S, state["rms"], gamma)
            D = S.addmm_(*((N.T, P.T) if transposed else (P, N)), alpha=group["scale"])
        else:  # N ← N · min(1, γ·RMS_{t-1}/RMS(N)) ;  D ← α P N
            D = self._limited_projection(N, P, state, group, transposed)
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, D, group["lr"], group["weight_decay"])
        state["step"] = t

    # -- pieces for some options only ----------------------------------------------------
    def _limited_projection(self, N: Tensor, P: Tensor, state: dict, group: dict, transposed: bool) -> Tensor:
        """``residual=False``: the limiter acts on N; D = α P N in W's layout."""
        if group["norm_growth_limit"] is not None:
            state["rms"] = norm_growth_limit_(N, state["rms"], group["norm_growth_limit"])
        N.mul_(group["scale"])
        return N.T @ P.T if transposed else P @ N

    def _randomized(self, p: Tensor, state: dict, group: dict, index: int, keep: int) -> tuple[Tensor, Tensor]:
        """``refresh="randomized"``: ``keep`` + oversample leading vectors and values from
        ``randomized_spectrum`` warm-started at P (the first refresh: an exact SVD)."""
        X = oriented(p, group["proj_type"])[0]
        state.setdefault("seed", stream_seed(group["seed"], index))
        if "P" not in state:
            return gradient_spectrum(X, keep)
        rng = _generator(p.device, stream_seed(state["seed"], state.get("step", 0) + 1))
        return randomized_spectrum(X, keep + REFRESH_OVERSAMPLE, state["P"], rng, group["refresh_iters"])

    @torch.compiler.disable  # bookkeeping over the matrices due, which change from step to step: eager
    def _hold(self, due: list, E: list, zero: list) -> tuple[list, list]:
        """Matrices with an all-zero X at their refresh: P and rank kept (coordinate
        axes at first), out of the allocation, refreshed at the next step.
        Returns the other matrices due, and their energies."""
        for (p, g, i), z in zip(due, zero):
            state = self.state[p]
            if not z:
                continue
            state["refresh_again"] = 1
            if g["refresh"] == "randomized":
                state.setdefault("seed", stream_seed(g["seed"], i))
            if "P" not in state:
                state["rank"] = min(g["rank"], *p.shape)
                state["P"] = torch.eye(min(p.shape), state["rank"], dtype=linalg_dtype(p.dtype), device=p.device)
        return [d for d, z in zip(due, zero) if not z], [e for e, z in zip(E, zero) if not z]

    def _stored(self, held: list, due: list) -> list:
        """``stagger``: the allocating matrices not due that take part with the
        spectrum of their own last refresh (state ``spectrum``, ``energy``)."""
        due_ids = {id(p) for p, _, _ in due}
        return [(p, g, i) for p, g, i in held if id(p) not in due_ids and "spectrum" in self.state[p]]

    @torch.compiler.disable  # bookkeeping over the matrices due, which change from step to step: eager
    def _keep_spectra(self, due, pool, svds, E, stored, allocated) -> None:
        """``stagger``: keep each refreshed spectrum for the allocations until the
        matrix's next refresh; a matrix not due and allocated less than it holds
        drops its last directions at once (columns of P, rows of the moments)."""
        for k in pool:
            self.state[due[k][0]].update(spectrum=svds[k][1].clone(), energy=E[k].reshape(1))
        for p, _, i in stored:
            state, r = self.state[p], allocated[i]
            if r < state["rank"]:
                state.update(P=state["P"][:, :r].contiguous(), rank=r, exp_avg=state["exp_avg"][:r].contiguous(),
                             exp_avg_sq=state["exp_avg_sq"][:r].contiguous())


# =============================================================================
# 6. LDAdam: a new subspace every step, projection-aware moments, error feedback
# =============================================================================


class LDAdam(_Base):
    r"""LDAdam (Robert et al., ICLR 2025), following the official code's update.

    Oriented gradient X (s×l), t = steps taken so far, k = t + 1::

        A ← X + E                                        (E: the error-feedback buffer)
        t = 0:  P ← top-r left singular vectors of A      (SVD)
        t > 0:  T = ρ · P_prev M / (1-β1ᵗ) + (1-ρ) · A
                P ← orth(T (Tᵀ P_prev))                   (one warm-started power iteration)
        R ← Pᵀ A
        C ← Pᵀ P_prev ;  M̃ ← C M                         (the first moment into the new basis)
        E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)      (generalized error feedback)
        V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²| ;  M ← M̃    (projection-aware V; c_i = 1-β_iᵗ)
        M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R²
        W ← W (1 - lr·wd) - lr · P (M/(1-β1ᵏ)) / (sqrt(V/(1-β2ᵏ)) + ε)

    Defaults are the official code's (``lr=1e-3, betas=(0.908, 0.99), rho=0.908,
    error_feedback=True``); ``rank`` per group, other groups AdamW. Options:
    ``proj_method`` ("power", or "svd": the top-r of T), ``error_dtype`` (None:
    float32, or float64 for a float64 parameter; torch.bfloat16 halves E),
    ``proj_type`` ("ldadam", the official rule: the rows when m <= n, squares
    included; or GaLore's rules). Our one change: E is optimizer state
    (``error``, m·n numbers), not kept in ``p.grad``, so ``zero_grad``,
    clipping and DDP's averaging never touch it::

        opt = LDAdam(lowrank_groups(model, rank=128), lr=1e-3)
    """

    _rank_fixed = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rho: float = 0.908, error_feedback: bool = True,
                 proj_method: str = "power", proj_type: str = "ldadam", error_dtype: Optional[torch.dtype] = None,
                 check_finite: bool = True):
        if error_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"Invalid error_dtype: {error_dtype}")
        self.error_dtype = error_dtype
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho,
                                      error_feedback=error_feedback, proj_method=proj_method,
                                      proj_type=proj_type, check_finite=check_finite))

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        _validate_options(group, {"rho": lambda v: 0.0 <= v <= 1.0, "proj_method": ("power", "svd")})
        if group.get("rank") is not None:
            _validate_rank(group, type(self).__name__, ("ldadam", *PROJ_TYPES))

    def _update(self, p: Tensor, state: dict, group: dict, index: int) -> None:
        """One LDAdam step of one matrix: the box above, line by line."""
        (beta1, beta2), ef = group["betas"], group["error_feedback"]
        X, transposed = oriented(p, group["proj_type"])  # X: (s, l)
        if len(state) == 0:
            state.update(step=0, rank=min(group["rank"], *p.shape))
        if ef and "error" not in state:  # also when switched on: E starts at 0
            state["error"] = X.new_zeros(X.shape, dtype=self.error_dtype or X.dtype)  # E: (s, l)
        elif not ef:
            state.pop("error", None)  # switched off: its m·n numbers freed
        t, rank, rho = state["step"], state["rank"], group["rho"]
        # A ← X + E   (in E's own buffer where the dtypes allow: E's old value is not needed again)
        A = X if not ef else state["error"].add_(X) if state["error"].dtype == X.dtype else state["error"].to(
            X.dtype).add_(X)
        if t == 0:
            # P ← top-r left singular vectors of A ;  R ← Pᵀ A ;  M, V ← 0 ;  E ← A - P R
            P = gradient_spectrum(A, rank)[0]
            R = P.T @ A
            M, V = X.new_zeros(rank, X.shape[1]), X.new_zeros(rank, X.shape[1])  # (r, l)
            if ef:
                A.addmm_(P, R, alpha=-1)
        else:
            P_prev, M, V = state["P"], state["exp_avg"], state["exp_avg_sq"]
            if group["proj_method"] == "power":  # P ← orth(T (Tᵀ P_prev)),  T = ρ P_prev M / c1 + (1-ρ) A
                P = power_iteration_basis(A, P_prev, M, rho / (1 - beta1**t), 1 - rho)
            else:  # P ← top-r left singular vectors of T
                P = gradient_spectrum(torch.addmm(A, P_prev, M, beta=1 - rho, alpha=rho / (1 - beta1**t)), rank)[0]
            # R ← Pᵀ A ;  C ← Pᵀ P_prev ;  M̃ ← C M
            R = P.T @ A
            C = P.T @ P_prev
            M_new = C @ M
            if ef:  # E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)
                generalized_error_feedback_(A, P, R, P_prev, M, M_new, beta1)
            # V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²| ;  M ← M̃
            V, M = transport_second_moment(V, M, M_new, C, t, beta1, beta2), M_new
        if ef and A is not state["error"]:
            state["error"].copy_(A)
        # M ← β1 M + (1-β1) R ;  V ← β2 V + (1-β2) R² ;  N ← M̂ / (sqrt(V̂) + ε)   (bias corrections at k = t+1)
        M.lerp_(R, 1 - beta1)
        V.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        N = (M / (1 - beta1 ** (t + 1))).div_((V.sqrt() / (1 - beta2 ** (t + 1)) ** 0.5).add_(group["eps"]))
        # W ← W (1 - lr·wd) - lr · P N   (in W's layout)
        apply_update_(p, N.T @ P.T if transposed else P @ N, group["lr"], group["weight_decay"])
        state.update(step=t + 1, P=P.contiguous(), exp_avg=M, exp_avg_sq=V)  # P row-major, as a checkpoint loads it


def power_iteration_basis(a: Tensor, P_prev: Tensor, M: Tensor, coef_m: float, coef_a: float) -> Tensor:
    """One block power iteration warm-started at P_prev: ``P = orth(T (Tᵀ P_prev))``,
    ``T = coef_m · P_prev M + coef_a · A`` never formed (``Tᵀ P_prev = coef_m Mᵀ +
    coef_a Aᵀ P_prev``, P_prev orthonormal); transposed so the full-size A is on the
    right of each product, the skinny products BLAS runs faster on a CPU."""
    y_t = (P_prev.T @ a).mul_(coef_a).add_(M, alpha=coef_m)  # Yᵀ = (Tᵀ P_prev)ᵀ: (r, l)
    z_t = torch.addmm((M @ y_t.T).T @ P_prev.T, y_t, a.T, beta=coef_m, alpha=coef_a)  # (T Y)ᵀ: (r, s)
    return orthonormalize(z_t.T)


def generalized_error_feedback_(a: Tensor, P: Tensor, R: Tensor, P_prev: Tensor, M: Tensor, M_new: Tensor,
                                beta1: float) -> Tensor:
    """``E ← (A - P R) + β1/(1-β1) · (P_prev M - P M̃)`` in place in ``a``: what
    projecting the gradient and re-projecting the momentum dropped, the lost
    momentum scaled to re-enter. Two full-size products: A - P (R + k M̃) + k P_prev M."""
    k = beta1 / (1 - beta1)
    a.addmm_(P, R if k == 0.0 else R + k * M_new, alpha=-1)
    if k != 0.0:
        a.addmm_(P_prev, M, alpha=k)
    return a


def transport_second_moment(V: Tensor, M: Tensor, M_new: Tensor, C: Tensor, t: int, beta1: float,
                            beta2: float) -> Tensor:
    """``V ← c2 · |(C∘C)(V/c2 - M²/c1²) + M̃²/c1²|`` (c1 = 1-β1ᵗ, c2 = 1-β2ᵗ): the variance
    V̂ - M̂² moved into the new basis (coordinates taken independent), plus the moved
    mean squared, at the EMA's scale; ``abs`` keeps it >= 0. The identity for C = I."""
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    variance = V / c2 - (M / c1).square()
    return torch.addmm((M_new / c1).square(), C * C, variance).abs_().mul_(c2)


# =============================================================================
# 7. Adapprox: Adam's second moment as an adaptive-rank randomized factorization
# =============================================================================


class Adapprox(_Base):
    r"""Adapprox (Zhao et al. 2024): Adam with a randomized low-rank second moment.

    Every 2-D parameter with min(m, n) >= 2 (unless its group says ``rank=None``)
    keeps ``V ≈ Q Uᵀ`` of rank k instead of a dense m×n V::

        V ← β2 · diag(r) Q Uᵀ diag(c) + (1-β2) · G²   (an m×n temporary; step 1: (1-β2)·G²)
        V ← max(V, 0) ;  r ← V 1 / 1ᵀ V 1 ;  c ← 1ᵀ V   (row shares, column sums)
        N ← V / (r cᵀ)                        (V relative to Adafactor's rank-1 estimate)
        Q, U ← S-RSI(N, k)                    (``srsi``, warm-started from Q)
        ξ ← ‖N - Q Uᵀ‖ / ‖N‖ ;  δ ← ‖N - Q Uᵀ‖ / sqrt(m·n)
        V̂ ← diag(r) max(|Q Uᵀ|, δ) diag(c) / (1-β2ᵗ)
        M ← β1 M + (1-β1) G ;  D ← (M/(1-β1ᵗ)) / (sqrt(V̂) + ε)   (β1 = 0: D ← G/(sqrt(V̂)+ε))
        D ← D / max(1, RMS(D)/d)              (update clipping, d = clip_threshold)
        D ← D · (1 + cos(M, G))               (cosine guidance, optional)
        W ← W (1 - lr·wd) - lr · D
        k ← max(k_min, min(k - rank_step, ⌊k/2⌋)) while ξ̄ < err_tol/2 from the start;
            then k ± rank_step above err_tol / below err_tol/2 (ξ̄: an EMA of ξ; ``_step_items``)

    k starts at k_max = max(1, ⌊k_max_frac·min(m, n)⌋) (or ``rank_init``; a
    group's integer ``rank`` caps it instead; ``rank=None`` keeps a dense V,
    carried over when the rank changes) and stays in [k_min, k_max]; ξ̄'s EMA
    (``err_beta``) is reseeded at each rank of the first descent. At k =
    min(m, n) V is kept dense (state ``V``): with clipping and guidance off,
    Adapprox is AdamW. Other parameters keep a dense V and the same rule. Our
    choices where the paper is silent (docs/DESIGN.md, "Adapprox"):
    ``row_col_scaling``, the floor δ, ``nonneg`` (``abs``; ``clamp``,
    ``floor``), ``warm_start`` and ``power_iters``, ``factor_dtype`` (float64),
    ``err_tol`` 0.5, and V formed at a power-of-two scale 4^-h (``u_exp``), so
    no square overflows for a finite gradient::

        opt = Adapprox(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    """

    _dense_elementwise = False  # clipping and guidance read the whole tensor: FSDP2 steps it whole
    _rank_converts = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, k_max_frac: float = 0.25, k_min: int = 1,
                 rank_init: Optional[int] = None, err_tol: float = 0.5, err_beta: float = 0.9, rank_step: int = 1,
                 oversample: int = 5, power_iters: int = 1, warm_start: bool = True, nonneg: str = "abs",
                 clip_threshold: Optional[float] = 1.0, cosine_guidance: bool = False, row_col_scaling: bool = True,
                 factor_dtype: str = "float64", seed: int = 0, check_finite: bool = True):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k_max_frac=k_max_frac, k_min=k_min,
            rank_init=rank_init, err_tol=err_tol, err_beta=err_beta, rank_step=rank_step, oversample=oversample,
            power_iters=power_iters, warm_start=warm_start, nonneg=nonneg, clip_threshold=clip_threshold,
            cosine_guidance=cosine_guidance, row_col_scaling=row_col_scaling, factor_dtype=factor_dtype, seed=seed,
            check_finite=check_finite))

    def _validate_group(self, group: dict) -> None:
        _validate_adam(group)
        count = lambda low: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
        _validate_options(group, {
            "k_max_frac": lambda v: 0.0 < v <= 1.0, "k_min": count(1), "rank_init": lambda v: v is None or count(1)(v),
            "err_tol": lambda v: v >= 0.0, "err_beta": lambda v: 0.0 <= v < 1.0, "rank_step": count(1),
            "oversample": count(0), "power_iters": count(0), "clip_threshold": lambda v: v is None or v > 0,
            "row_col_scaling": lambda v: isinstance(v, bool), "factor_dtype": ("float32", "float64"),
            "nonneg": NONNEG_RULES})
        _check(not group["cosine_guidance"] or group["betas"][0] > 0,
               "Invalid cosine_guidance: it needs a first moment (betas[0] > 0)")
        if group.get("rank") is not None:
            _check(count(1)(group["rank"]),
                   f"Invalid rank: {group['rank']!r} (an integer >= 1, or None for a dense second moment)")
            for p in group["params"]:
                _check(p.dim() == 2, f"Invalid parameter in a 'rank' group: shape {tuple(p.shape)} is not 2-D "
                                     "(put 1-D and other tensors in a group without 'rank')")

    @staticmethod
    def is_factored(p: Tensor, group: Optional[dict] = None) -> bool:
        """Whether V of ``p`` is factored: a 2-D tensor with min(m, n) >= 2, in a
        group whose ``rank`` is not None."""
        return p.dim() == 2 and min(p.shape) >= 2 and (group is None or group.get("rank", 0) is not None)

    @staticmethod
    def rank_bounds(p: Tensor, group: dict) -> tuple[int, int, int]:
        """[k_min, k_max] and the first rank: k_max = max(1, ⌊k_max_frac·min(m, n)⌋),
        or the group's integer rank; the first rank is k_max, or ``rank_init``."""
        k_max = min(group["rank"], *p.shape) if group.get("rank") is not None else max(
            1, int(group["k_max_frac"] * min(p.shape)))
        k_min = min(group["k_min"], k_max)
        init = group.get("rank_init")
        return k_min, k_max, k_max if init is None else max(k_min, min(k_max, init))

    @staticmethod
    def factor_dtype(p: Tensor, group: dict) -> torch.dtype:
        """V's dtype: float64 if the group asks (MPS has none) or p is float64, else float32."""
        wide = group.get("factor_dtype") == "float64" and p.device.type != "mps"
        return torch.float64 if wide else linalg_dtype(p.dtype)

    def ranks(self) -> list[int]:
        """Current rank k of each factored parameter, in param-group order."""
        return [self.state.get(p, {}).get("rank") or self.rank_bounds(p, g)[2]
                for g in self.param_groups for p in g["params"] if self.is_factored(p, g)]

    def _step_items(self, items: list[tuple[Tensor, dict, int]], peers=None) -> None:
        """Each tensor's step, then each factored matrix's next rank k from ξ
        (one host sync for all of them)."""
        factored = []
        for (p, group, _), plan in zip(items, self._prepare(items)):
            if plan is None:
                self._dense_update(p, self.state[p], group)
            else:
                factored.append((p, group, plan, self._update(p, self.state[p], group, *plan[:2])))
        for (p, group, (_, _, k_min, k_max), _), xi in zip(factored, _to_host([f[3] for f in factored])):
            state, beta, tol, step = self.state[p], group["err_beta"], group["err_tol"], group["rank_step"]
            k, descending = state["rank"], state.get("descending", state["step"] == 1)
            # ξ̄ ← EMA of ξ (reseeded at each rank of the first descent)
            ema = state["err_ema"] = xi if descending else beta * state["err_ema"] + (1 - beta) * xi
            if descending and ema < tol / 2 and k > k_min:  # first descent: k ← max(k_min, min(k - step, ⌊k/2⌋))
                state["rank"], state["descending"] = max(k_min, min(k - step, k // 2)), True
            else:  # then, settled: k ± step above err_tol / below err_tol/2 (hysteresis), within [k_min, k_max]
                k = k + step if ema > tol else k - step if ema < tol / 2 else k
                state["rank"], state["descending"] = max(k_min, min(k_max, k)), False

    @torch.compiler.disable
    def _prepare(self, items: list[tuple[Tensor, dict, int]]) -> list:
        """Before any update (torch.compile cannot trace seeded draws, and a break inside
        the arithmetic mixed up shapes): V carried over where a rank went between None
        and an integer, the state set up, k clamped to its cap, and Ω drawn. Returns
        None for a dense tensor, else (Ω, V's dtype, k_min, k_max), Ω None at full rank."""
        plans = []
        for p, group, index in items:
            state, factored = self.state[p], p.dim() == 2 and min(p.shape) >= 2 and group.get("rank", 0) is not None
            if ("exp_avg_sq" if factored else "u_exp") in state:  # V carried over (``is_factored`` changed)
                self._convert_second_moment(p, group)
            if not factored:
                plans.append(None)
                continue
            k_min, k_max, k_init = self.rank_bounds(p, group)
            fd = torch.float64 if group["factor_dtype"] == "float64" and p.device.type != "mps" else (
                torch.promote_types(p.dtype, torch.float32))  # (``factor_dtype``)
            if len(state) == 0:
                state.update(step=0, rank=k_init, err_ema=0.0)
            elif "u_exp" in state and state["u_exp"].dtype != fd:  # a changed factor_dtype: converted once
                state.update({k: state[k].to(fd) for k in ("Q", "U", "row", "col", "V", "u_exp") if k in state})
            state.setdefault("seed", stream_seed(group["seed"], index))  # Ω at step t: stream_seed(this, t)
            k = state["rank"] = max(k_min, min(k_max, state["rank"]))  # a lowered cap holds at once
            # Ω: n × (k + p), less the columns a warm start provides; none at full rank (V kept dense)
            width = min(k + group["oversample"], *p.shape)
            warm = min(state["Q"].shape[1], k, width) if group["warm_start"] and "Q" in state else 0
            omega = torch.randn(p.shape[1], width - warm, device=p.device, dtype=fd, generator=torch.Generator(
                p.device).manual_seed(stream_seed(state["seed"], state["step"] + 1))) if k < min(p.shape) else None
            plans.append((omega, fd, k_min, k_max))
        return plans

    def _update(self, p: Tensor, state: dict, group: dict, omega: Optional[Tensor], fd: torch.dtype) -> Tensor:
        """One Adapprox step of one factored matrix: the box above, line by line
        (at the scale 4^-h; ``fd``: V's dtype, float64 by default). Returns ξ."""
        (beta1, beta2), t = group["betas"], state["step"] + 1
        G = p.grad.to(torch.promote_types(p.dtype, torch.float32))  # G: (m, n)
        # h = ⌊log2 max(max|G|, sqrt(max V_{t-1}))⌋: G·2^-h and V/4^h are at most about 1, and powers of
        # two scale exactly (G² overflows float32 above 2^64). U (or V) is stored at scale 4^-e, e = u_exp.
        size = torch.log2(torch.stack(torch.aminmax(G)).abs().amax()).to(fd)  # log2 max|G|, without |G|
        if t > 1:  # the previous V: dense, or Q Uᵀ with diag(r), diag(c) taken into the skinny factors
            e, Q_prev, U_prev = state["u_exp"], state.get("Q"), state.get("U")
            if "row" in state:
                Q_prev, U_prev = Q_prev * state["row"][:, None], U_prev * state["col"][:, None]
            top = state["V"].amax() if "V" in state else U_prev.abs().amax() * (  # >= max |Q Uᵀ|
                Q_prev.abs().amax() if "row" in state else 1.0)
            size = torch.maximum(size, e + 0.5 * torch.log2(top))
        h = torch.floor(size).clamp(-126, 126)
        # V ← β2 · diag(r) Q Uᵀ diag(c) + (1-β2) · G²   (at scale 4^-h)
        v = G.to(fd, copy=True).mul_(torch.exp2(-h)).square_().mul_(1 - beta2)
        if t > 1 and "V" in state:
            v.addcmul_(state["V"], torch.exp2(2 * (e - h).clamp(-63, 63)), value=beta2)
        elif t > 1:
            v.addmm_(Q_prev, (U_prev * torch.exp2(2 * (e - h).clamp(-63, 63))).T, alpha=beta2)
        if omega is None:  # full rank: V̂ ← max(V, 0), kept dense; ξ = 0
            xi, v_hat = self._keep_dense(v, state), v
        else:
            # V ← max(V, 0) ;  r ← V 1 / 1ᵀ V 1 ;  c ← 1ᵀ V ;  N ← V / (r cᵀ)   (``row_col_scaling``)
            scales = dict(zip(("row", "col"), row_col_scales(v.clamp_min_(0)))) if group["row_col_scaling"] else {}
            if scales:
                v.div_(scales["row"][:, None]).div_(scales["col"][None, :])
            # Q, U ← S-RSI(N, k)   (warm-started from the previous Q)
            Q, U = srsi(v, state["rank"], group["oversample"], group["power_iters"],
                        init=state.get("Q") if group["warm_start"] else None, omega=omega)
            # ξ ← ‖N - Q Uᵀ‖ / ‖N‖ ;  δ ← ‖N - Q Uᵀ‖ / sqrt(m·n)   (the residual formed exactly in N's buffer)
            norm_n = torch.linalg.vector_norm(v)
            residual = torch.linalg.vector_norm(v.addmm_(Q, U.T, alpha=-1))
            xi = residual / norm_n.clamp_min(1e-30)  # (0 for N = 0)
            # V̂ ← diag(r) max(|Q Uᵀ|, δ) diag(c)   (into N's buffer)
            v_hat = v.addmm_(Q, U.T, beta=0)
            if group["nonneg"] == "abs":
                v_hat.abs_()
            else:
                self._nonneg(v_hat, G, h, group, **scales)
            v_hat.clamp_min_(residual / math.sqrt(v.numel()))
            if scales:
                v_hat.mul_(scales["row"][:, None]).mul_(scales["col"][None, :])
            for key in ("V", "row", "col"):
                state.pop(key, None)
            state.update(Q=Q, U=U, **scales)
        state.update(step=t, u_exp=h)
        # sqrt(V̂/(1-β2ᵗ)) + ε = sqrt(V̂/4^h) · 2^h / sqrt(1-β2ᵗ) + ε   (in place; then in G's dtype)
        denom = v_hat.sqrt_().mul_(torch.exp2(h)).div_((1 - beta2**t) ** 0.5).add_(group["eps"]).to(G.dtype)
        del v, v_hat  # (a float64 V's buffer freed before the float32 update's temporaries)
        self._direction(p, G, denom, state, group, t)
        return xi

    def _direction(self, p: Tensor, G: Tensor, denom: Tensor, state: dict, group: dict, t: int) -> None:
        """From ``denom = sqrt(V̂) + ε`` on (overwritten with D): the first
        moment, clipping, guidance and the update; shared with dense tensors."""
        beta1 = group["betas"][0]
        if beta1 == 0:  # D ← G / denom   (no first moment; one left from β1 > 0 is freed)
            M, D = state.pop("exp_avg", None), torch.div(G, denom, out=denom)
        else:  # M ← β1 M + (1-β1) G ;  D ← (M / denom) / (1-β1ᵗ)   (M: (m, n), from 0)
            M = state["exp_avg"] = (state["exp_avg"] if "exp_avg" in state else torch.zeros_like(G)).lerp_(G, 1 - beta1)
            D = denom.reciprocal_().mul_(M).div_(1 - beta1**t)
        if group["clip_threshold"] is not None:  # D ← D / max(1, RMS(D)/d)
            D.div_((torch.linalg.vector_norm(D) / math.sqrt(D.numel()) / group["clip_threshold"]).clamp_min(1.0))
        if group["cosine_guidance"]:  # D ← D · (1 + cos(M, G))
            D.mul_(1 + torch.dot(M.flatten(), G.flatten()) / (torch.linalg.vector_norm(M) *
                                                              torch.linalg.vector_norm(G)).clamp_min(1e-30))
        # W ← W (1 - lr·wd) - lr · D
        apply_update_(p, D, group["lr"], group["weight_decay"])

    # -- pieces for some options and states only -------------------------------------
    def _keep_dense(self, v: Tensor, state: dict) -> Tensor:
        """Full rank: V kept dense at scale (a negative entry, the error of a
        factorization before the rank grew, set to 0); ξ = 0."""
        for key in ("Q", "U", "row", "col"):
            state.pop(key, None)
        v.clamp_min_(0)
        state["V"] = state["V"].copy_(v) if "V" in state else v.clone()
        return torch.zeros((), dtype=v.dtype, device=v.device)

    def _nonneg(self, v_hat: Tensor, G: Tensor, h: Tensor, group: dict, row=None, col=None) -> None:
        """``nonneg="clamp"``: max(Q Uᵀ, 0); ``"floor"``: max(Q Uᵀ, (1-β2)·G²),
        a true lower bound of the EMA (scaled like N)."""
        if group["nonneg"] == "clamp":
            v_hat.clamp_min_(0)
            return
        floor = torch.mul(G, torch.exp2(-h)).square_().mul_(1 - group["betas"][1])
        if row is not None:
            floor.div_(row[:, None]).div_(col[None, :])
        v_hat.clamp_min_(floor)

    def _dense_update(self, p: Tensor, state: dict, group: dict) -> None:
        """A tensor that is not factored: an exact dense V, the same rule."""
        beta2 = group["betas"][1]
        G = p.grad.to(linalg_dtype(p.dtype))
        if len(state) == 0:
            state.update(step=0, exp_avg_sq=torch.zeros_like(G))
        t = state["step"] = state["step"] + 1
        state["exp_avg_sq"].mul_(beta2).addcmul_(G, G, value=1 - beta2)  # V ← β2 V + (1-β2) G²
        self._direction(p, G, (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"]), state, group, t)

    def _convert_second_moment(self, p: Tensor, group: dict) -> None:
        """V carried over when the group's ``rank`` went from None to an integer (dense V,
        factored from the first rank on) or back (V = diag(r) Q Uᵀ diag(c) · 4^e, clamped at 0)."""
        state, fd = self.state[p], self.factor_dtype(p, group)
        if self.is_factored(p, group):
            V = state.pop("exp_avg_sq")
            state.update(V=V.to(fd), u_exp=V.new_zeros((), dtype=fd), rank=self.rank_bounds(p, group)[2],
                         err_ema=0.0, descending=True)
            return
        if "V" in state:
            V = state["V"]
        else:
            Q, U = state["Q"], state["U"]
            if "row" in state:
                Q, U = Q * state["row"][:, None], U * state["col"][:, None]
            V = (Q @ U.T).clamp_min_(0)
        V = V * torch.exp2(2 * state["u_exp"])
        for key in ("Q", "U", "row", "col", "V", "u_exp", "rank", "err_ema", "descending"):
            state.pop(key, None)
        state["exp_avg_sq"] = V.to(linalg_dtype(p.dtype))


NONNEG_RULES = ("abs", "floor", "clamp")  # how Q Uᵀ is made >= 0 before its square root


def srsi(V: Tensor, rank: int, oversample: int = 5, power_iters: int = 1,
         generator: Optional[torch.Generator] = None, init: Optional[Tensor] = None,
         omega: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Streamlined randomized subspace iteration: ``V ≈ Q Uᵀ`` of rank k, Q
    (m×k) orthonormal and ``U = Vᵀ Q`` (n×k)::

        Q ← orth([Q₀[:, :k], V Ω])        Ω: n×(k+p) Gaussian, less the columns
                                          a warm start Q₀ = ``init`` provides
        l times:  Q ← orth(V orth(Vᵀ Q))  (orthonormalized after every product)
        B ← Qᵀ V = Ũ Σ W̃ᵀ ;  Q ← Q Ũ[:, :k] ;  U ← W̃[:, :k] Σ_k

    The warm start is ours (V changes by (1-β2)·G² a step). ``omega`` may be drawn
    beforehand (``sketch_columns`` columns). Products keep V on the right (fast).
    """
    m, n = V.shape
    V = V.to(torch.promote_types(V.dtype, torch.float32))
    warm = init[:, :min(rank, m, n)] if init is not None else V.new_zeros(m, 0)
    if omega is None:
        omega = torch.randn(n, sketch_columns(V.shape, rank, oversample, init), generator=generator,
                            device=V.device, dtype=V.dtype)
    qr = lambda x: torch.linalg.qr(x, mode="reduced").Q  # noqa: E731  (orthonormal columns)
    Q = qr(torch.cat([warm.to(V.dtype), (omega.T @ V.T).T], dim=1))  # (m, k+p)
    for _ in range(power_iters):
        Q = qr((qr((Q.T @ V).T).T @ V.T).T)
    u_b, sigma, w_bh = torch.linalg.svd(Q.T @ V, full_matrices=False)
    k = min(rank, m, n)
    return Q @ u_b[:, :k], (w_bh[:k].T * sigma[:k]).contiguous()


def sketch_columns(shape: Sequence[int], rank: int, oversample: int, init: Optional[Tensor] = None) -> int:
    """Columns of Ω that ``srsi`` needs: k + p (at most min(m, n)), less those of a warm start."""
    width = min(rank + oversample, *shape)
    return width - (0 if init is None else min(init.shape[1], rank, width))


def row_col_scales(v: Tensor) -> tuple[Tensor, Tensor]:
    """Adafactor's rank-1 estimate ``row colᵀ`` of a non-negative V: row = V 1 /
    1ᵀ V 1 (shares summing to 1), col = 1ᵀ V, clamped at 2^-40 (of V's total),
    so every V_ij / (row_i col_j) <= 2^40 and squares stay in float32's range."""
    total = v.sum()
    row = (v.sum(dim=1) / total.clamp_min(torch.finfo(v.dtype).tiny)).clamp_min(2.0**-40)
    col = torch.maximum(v.sum(dim=0), 2.0**-40 * total).clamp_min(torch.finfo(v.dtype).tiny)
    return row, col


# =============================================================================
# 8. Helpers for users: param groups, state memory, srsi's error
# =============================================================================


def lowrank_groups(model: nn.Module, rank: int, *, targets: Sequence[str] = ("attn", "mlp"),
                   embeddings: bool = False, verbose: bool = False, **group_options) -> list[dict]:
    """Param groups in the GaLore / LDAdam convention, for any of the four optimizers.

    Every 2-D parameter whose qualified name contains one of ``targets`` goes into
    ``{"params": ..., "rank": rank, **group_options}`` (Adapprox: the cap of its
    adaptive rank), every other one into ``{"params": ..., "rank": None}`` (dense).
    By name and shape, not module type: ``nn.Linear``, GPT-2's ``Conv1D`` and packed
    ``in_proj_weight`` alike; an ``nn.Embedding`` weight (and a head tied to it) only
    with ``embeddings=True``. Other models: ``targets=("self_attn", "linear1")``. It
    warns when no target matches a 2-D parameter; ``verbose=True`` prints the choice.
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
    groups = [{"params": [p for _, p in rest], "rank": None}] if rest else []
    if lowrank:
        groups.append({"params": [p for _, p in lowrank], "rank": rank, **group_options})
    return groups


def state_bytes(optimizer: Optimizer, by_key: bool = False):
    """Bytes held by the optimizer's state tensors on this rank (under FSDP2, a
    DTensor's local shard, and the low-rank states this rank owns); with
    ``by_key=True``, ``{state name: bytes}`` (``exp_avg``, ``P``, ``error``, ...)."""
    totals: dict[str, int] = {}
    for st in optimizer.state.values():
        for name, v in st.items():
            if isinstance(v, Tensor):
                v = v.to_local() if is_dtensor(v) else v  # FSDP2: this rank's shard
                totals[name] = totals.get(name, 0) + v.numel() * v.element_size()
    return totals if by_key else sum(totals.values())


def srsi_relative_error(V: Tensor, U: Tensor) -> Tensor:
    """``‖V - Q Uᵀ‖_F / ‖V‖_F`` for srsi's output (Q Uᵀ projects V, so the
    squared error is ‖V‖² - ‖U‖²); 0 for V = 0. Cancellation limits it to ~1e-3."""
    v2, u2 = torch.linalg.vector_norm(V).square(), torch.linalg.vector_norm(U).square()
    return torch.where(v2 > 0, (v2 - u2).clamp_min(0).sqrt() / v2.sqrt().clamp_min(1e-30), torch.zeros_like(v2))


__all__ = ["GaLoreAdamW", "AdaptiveAdamW", "LDAdam", "Adapprox", "lowrank_groups", "state_bytes",
           "NonFiniteGradientError"]
