"""lowrank_engine: where lowrank_adam's optimizers meet FSDP2 and layer-wise training.

lowrank_adam.py needs none of this for eager, ``torch.compile``, DDP, ZeRO-1 or
exact resume. Its optimizers call it only when a parameter is a DTensor (a
weight sharded by FSDP2's ``fully_shard``), a state dict holds FSDP2 owner
markers, a parameter is stepped alone, or a refusal can say more:

* ``fsdp2_step(optimizer, items)``: ``step()`` of sharded parameters. Each
  low-rank matrix is gathered whole on one owner rank, which alone holds its
  state and runs the optimizer's own ``_step_items`` on it; the new rows go
  back to every rank.
* ``full_state`` and ``place_state``: a full state dict (torch.distributed.
  checkpoint's, ``full_state_dict=True``) holds every matrix's state,
  gathered from its owner, so a run resumes on any number of ranks; before
  ``load_state_dict`` loads anything, each rank keeps what it owns, or every
  rank alike refuses a state dict whose low-rank states would not reach
  their owners.
* ``step_parameter(optimizer, p)``: one parameter's step, for
  ``layerwise_hooks``, which steps each parameter inside the backward pass.
* ``option_hint`` and ``check_state_dict``: whose option a refused group key
  is, which optimizer wrote a foreign state dict, and older state dicts read
  (where this file is missing, the core's refusals are shorter).

What they use of an optimizer is its ``state``, ``param_groups``,
``_check_grads``, ``_step_items(items, peers)`` and ``_dense_elementwise``.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import Tensor
from torch.optim import Optimizer

import lowrank_adam as la
from lowrank_adam import is_dtensor




def _row_split(rows: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard, as FSDP2 (``torch.chunk``) cuts them:
    ⌈rows / world⌉ each, the last ones shorter or empty."""
    step = -(-rows // world)
    return [max(0, min(step, rows - r * step)) for r in range(world)]


def _owner_ranks(optimizer: Optimizer, world: int) -> dict[int, int]:
    """Owner rank of each matrix FSDP2 steps whole (parameter index -> rank),
    balanced by work (m·n): group by group, in the order the groups were
    added, each group's matrices largest first, each to the rank with the
    least m·n so far (ties: the lower rank). Largest first, so that a last
    large matrix (an LM head) does not tip one rank; group by group, so that
    a group added later moves no earlier matrix, whose state is on its owner."""
    load, owner, index = [0] * world, {}, 0
    for group in optimizer.param_groups:
        mats = []
        for p in group["params"]:
            if _stepped_whole(optimizer, p, group):
                mats.append((-p.numel(), index))
            index += 1
        for size, i in sorted(mats):
            owner[i] = min(range(world), key=lambda r: (load[r], r))
            load[owner[i]] -= size
    return owner


class Peers:
    """The collectives a step that needs every rank's matrices uses under FSDP2
    (AdaptiveAdamW's global allocation): passed to ``optimizer._step_items``."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device

    def sum(self, counts: list[int]) -> list[int]:
        total = torch.tensor(counts, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total, group=self.group)
        return total.tolist()

    def gather(self, records: list[tuple]) -> list[tuple]:
        """Every rank's records, ordered by their first entry (the parameter index);
        their tensors reach every rank as floats or lists of floats."""
        flat = la._to_host([v for r in records for v in r])  # one transfer per device
        records = [tuple(flat[i * len(r):(i + 1) * len(r)]) for i, r in enumerate(records)]
        every: list = [None] * torch.distributed.get_world_size(self.group)
        torch.distributed.all_gather_object(every, records, group=self.group)
        return sorted((r for part in every for r in part), key=lambda r: r[0])


def _exchange(send: list[list[Tensor]], recv_numels: list[int], group, dtype: torch.dtype,
              device: torch.device, me: int) -> list:
    """One all-to-all: the tensors ``send[r]`` (flattened, packed) go to rank r;
    returns what each rank sent here, one flat tensor per rank. This rank's
    own part is not packed or sent: it comes back as its list of flat views
    (so the buffers hold only what crosses ranks: half the data at 2 ranks)."""
    parts = [t.reshape(-1).to(dtype) for r, ts in enumerate(send) if r != me for t in ts]
    inp = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    sent = [0 if r == me else sum(t.numel() for t in ts) for r, ts in enumerate(send)]
    received = [0 if r == me else n for r, n in enumerate(recv_numels)]
    out = torch.empty(sum(received), dtype=dtype, device=device)
    torch.distributed.all_to_all_single(out, inp, received, sent, group=group)
    got: list = list(out.split(received))
    got[me] = [t.reshape(-1).to(dtype) for t in send[me]]
    return got


def _pieces(flat, sizes: list[int]) -> list[Tensor]:
    """A rank's part of an exchange as its pieces: a flat tensor split by ``sizes``
    (views), or this rank's own part, which is its list of pieces already."""
    return flat if isinstance(flat, list) else list(flat.split(sizes))


def _assemble(got: list, mine: list[tuple[Tensor, int]], rows: dict, width: dict) -> dict:
    """Each owned matrix (parameter, index) whole, W and G, from what every rank
    sent here (its rows of W, then of G, of each matrix in order): index ->
    (W, G), copies that do not keep ``got``."""
    pieces: dict[int, tuple[list[Tensor], list[Tensor]]] = {i: ([], []) for _, i in mine}
    for r, flat in enumerate(got):
        chunks = iter(_pieces(flat, [rows[i][r] * width[i] for _, i in mine for _ in (0, 1)]))
        for p, i in mine:
            for part in pieces[i]:  # rank r's rows of W, then of G
                part.append(next(chunks).view(rows[i][r], *p.shape[1:]))
    return {i: (torch.cat(w), torch.cat(g)) for i, (w, g) in pieces.items()}


def _mesh_of(sharded: list[Tensor]):
    """The one device mesh of the DTensor parameters ``sharded``: 1-D (FSDP2's
    default), or 2-D replicate × shard (HSDP); several meshes, or more
    dimensions, are refused."""
    mesh = sharded[0].device_mesh
    if mesh.ndim > 2:
        raise NotImplementedError(f"lowrank_adam under FSDP2: parameters on a 1-D mesh or a 2-D (replicate, shard) "
                                  f"mesh (HSDP) only, not a {mesh.ndim}-D one. Nothing was changed.")
    if any(p.device_mesh != mesh for p in sharded):
        raise NotImplementedError("lowrank_adam under FSDP2: parameters on one device mesh only; these are on "
                                  "several meshes. Nothing was changed.")
    return mesh


def _shard_dim(mesh) -> tuple:
    """(process group, size, this rank's index) of the mesh dimension that
    shards: a 1-D mesh's one, or HSDP's second. Under HSDP each replica
    group steps alike on the same reduced gradients, so the replicas stay
    equal with no collective between them."""
    d = mesh.ndim - 1
    return mesh.get_group(d), mesh.size(d), mesh.get_local_rank(d)


def _row_sharded(p: Tensor) -> bool:
    """Whether ``p``'s placements split its rows over the shard dimension and
    replicate it over any other: (Shard(0),) or (Replicate(), Shard(0))."""
    *rest, last = p.placements
    return last.is_shard(0) and all(pl.is_replicate() for pl in rest)


def _stepped_whole(optimizer: Optimizer, p: Tensor, group: dict) -> bool:
    """Whether FSDP2 steps ``p`` (of ``group``) whole on its owner rank, not
    shard by shard: a sharded low-rank matrix, or any sharded parameter of
    an optimizer whose dense step is not elementwise (Adapprox)."""
    return is_dtensor(p) and (group.get("rank") is not None or not getattr(optimizer, "_dense_elementwise", True))


def _as_dtensor_like(v: Tensor, p: Tensor) -> Tensor:
    """``v``, this rank's shard, as a DTensor sharded like the parameter ``p``."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


@torch.no_grad()
def fsdp2_step(optimizer: Optimizer, items: list[tuple[Tensor, dict, int]]) -> None:
    """``step()`` when FSDP2 (``fully_shard``) has sharded the parameters:
    DTensors on a 1-D mesh, split by rows (dim 0) across the ranks, or on an
    HSDP mesh (replicate, shard), where each replica group does what
    follows within its shard group (``_shard_dim``).

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
    ranks as one process does (``Peers``). Random draws are seeded by the
    global parameter index, so they are one process's, and so is the step:
    the same code on the same whole tensors. Adapprox (its clipping and
    guidance read a whole tensor: ``_dense_elementwise``) steps every
    parameter on an owner. Layer-wise updates (``layerwise_hooks``) call it
    with one parameter at a time, from inside FSDP2's reduce-scatter of that
    parameter's gradient: the same step, with these collectives per parameter.
    """
    opt = optimizer
    mesh = _mesh_of([p for p, _, _ in items if is_dtensor(p)])
    group, world, me = _shard_dim(mesh)
    device = next(p.device for p, _, _ in items if is_dtensor(p))

    def whole(p: Tensor, g: dict) -> bool:
        return _stepped_whole(opt, p, g)

    def local(t: Tensor) -> Tensor:
        return t.to_local() if is_dtensor(t) else t

    owner = _owner_ranks(opt, world)
    for p, g, _ in items:  # whole matrices: split by rows as torch.chunk splits them (``_row_split``)
        if is_dtensor(p) and (p.grad.placements != p.placements or (whole(p, g) and (
                not _row_sharded(p) or p.to_local().shape[0] != _row_split(p.shape[0], world)[me]))):
            raise NotImplementedError(f"lowrank_adam under FSDP2: a parameter of shape {tuple(p.shape)} with "
                                      f"placements {p.placements} (gradient {p.grad.placements}); expected Shard(0), "
                                      "or (Replicate(), Shard(0)) under HSDP")

    # AdaptiveAdamW's allocation sums and gathers every rank's matrices: a plain (unsharded) one, on every rank
    # alike, would count once per rank
    plain = [p for p, g, _ in items if not is_dtensor(p) and g.get("rank") is not None and g.get("allocate")]
    if plain:
        raise NotImplementedError(f"{type(opt).__name__} under FSDP2: its allocation needs every matrix of an "
                                  f"allocating group sharded by fully_shard; the one of shape {tuple(plain[0].shape)} "
                                  "is a plain tensor, which every rank would count. Shard its module (or the root), "
                                  "or use allocate=False. Nothing was changed.")

    # the optimizer's own refusals (a group's rank changed after steps, a complex gradient) before anything
    # changes, on every rank alike: each parameter checked as an empty (meta) tensor of its shape with its
    # state, where a non-owner's marker stands for the low-rank state its owner holds
    for p, g, i in items:
        state = opt.state.get(p, {})
        w = torch.empty(p.shape, dtype=p.grad.dtype, device="meta")
        w.grad = torch.empty(p.shape, dtype=p.grad.dtype, device="meta")
        opt.state[w] = {"P": None, **state} if "owner" in state else state
        try:
            opt._check_grads([(w, {**g, "check_finite": False}, i)])
        finally:
            opt.state.pop(w, None)

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
            raise la.NonFiniteGradientError(
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
                    [sum(2 * rows[i][r] * width[i] for _, _, i in mine) for r in range(world)], group, dtype, device, me)
    received = _assemble(got, [(p, i) for p, _, i in mine], rows, width)
    del got  # only the whole matrices are held through the step, not the buffer they came in

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
            W, G = received.pop(i)
            w, w.grad = W.to(p.dtype), G.to(p.grad.dtype)
            opt.state[w] = state  # the same dict: the state is the parameter's
        elif is_dtensor(p):
            w = p.to_local()  # a view of this rank's shard
            w.grad = p.grad.to_local()
            opt.state[w] = {k: local(v) for k, v in opt.state[p].items()}
            shards.append((p, w))
        else:
            w = p
        if w is not p:
            stand_ins.append(w)
        step_items.append((w, g, i))
    try:
        opt._step_items(step_items, Peers(group, device))
    finally:
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
                    group, dtype, device, me)
    for r, flat in enumerate(got):
        theirs = [(p, i) for p, _, i in mats if owner[i] == r]
        *chunks, ranks = _pieces(flat, [rows[i][me] * width[i] for _, i in theirs] + [len(theirs)])
        for (p, i), chunk in zip(theirs, chunks):
            local(p).copy_(chunk.view(local(p).shape))
        if r != me:
            for (p, _), k in zip(theirs, ranks.tolist()):
                if k >= 0:
                    opt.state[p]["rank"] = int(k)


_RESUME_PATHS = ("Resume on the same number of ranks with the sharded get_optimizer_state_dict / "
                 "set_optimizer_state_dict of torch.distributed.checkpoint.state_dict (or dcp.save / dcp.load), or on "
                 "any number of ranks, or in one process, with a full state dict: get_optimizer_state_dict(..., "
                 "options=StateDictOptions(full_state_dict=True)) when saving, and set_optimizer_state_dict with "
                 "full_state_dict=True on every rank, each given the whole dict, when loading")


def _dcp_call(names: tuple[str, ...]):
    """The local variables of the innermost call, on this thread's stack, of one
    of the functions ``names`` of torch.distributed.checkpoint.state_dict (None
    if there is none): what ``state_dict`` and ``load_state_dict`` are called
    for (``options``, or ``info`` in its private functions) reaches them no
    other way."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if (frame.f_code.co_name in names
                    and frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict"):
                return frame.f_locals
            frame = frame.f_back
        return None
    finally:
        del frame


def _whole_entries(optimizer: Optimizer) -> dict[int, Tensor]:
    """Index in the state dict -> parameter, of the parameters FSDP2 steps whole on an owner."""
    pairs = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    return {i: p for i, (p, g) in enumerate(pairs) if _stepped_whole(optimizer, p, g)}


def full_state(optimizer: Optimizer, state_dict: dict) -> dict:
    """``state_dict()`` under FSDP2. Each rank's own state dict holds the states of
    the matrices it owns and a marker ``{"owner": r}`` for each of the others.
    Inside torch's full-state-dict getters (``get_optimizer_state_dict`` or
    ``get_state_dict`` with ``full_state_dict=True``) each owner sends the
    states it holds to every rank of its shard group (one all-gather, on the
    CPU), which put them in place of the markers: the full state dict then
    holds every matrix's state, as one process's does, and fits any number
    of ranks (``place_state`` keeps each rank's part when it is loaded).
    Torch's full-state-dict loaders take this rank's state dict as the
    pattern of what they load (a value whose key it lacks breaks them), so
    there it is complete too."""
    getter = _dcp_call(("_get_optim_state_dict",))
    if not (getattr(getter and getter.get("info"), "full_state_dict", False)
            or _dcp_call(("_load_optim_state_dict",)) is not None):  # (torch's own state dict, to load a full one into)
        return state_dict
    whole = _whole_entries(optimizer)
    group, world, _ = _shard_dim(_mesh_of([p for g in optimizer.param_groups for p in g["params"] if is_dtensor(p)]))
    mine = {i: {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
            for i, st in state_dict["state"].items() if i in whole and st and "owner" not in st}
    every: list = [None] * world
    torch.distributed.all_gather_object(every, mine, group=group)
    return {**state_dict, "state": {**state_dict["state"], **{i: st for part in every for i, st in part.items()
                                                              if i not in mine}}}


def place_state(optimizer: Optimizer, state_dict: dict) -> dict:
    """Before ``load_state_dict`` loads anything: the part of ``state_dict`` this
    rank keeps, or a refusal (on every rank alike, before any rank loads).

    Under FSDP2 a matrix's state is held by its owner rank alone (``_owner_ranks``
    of this run: of its number of ranks and param groups); every other rank
    keeps the marker ``{"owner": r}`` (and the matrix's ``rank``). So a state
    dict loads when, for every matrix, the rank that owns it in this run has
    its state; each rank then keeps the states it owns and a marker for the
    rest. That holds for

    * each rank's own (sharded) state dict, on as many ranks with the same
      param groups (each matrix has the same owner as before);
    * a full state dict (``full_state``, or one process's) on any number of
      ranks, each given the whole dict: this is how a run moves to another
      number of ranks, or to one process, or from one process to FSDP2.

    Refused, naming what works: one rank's sharded state dict in one process
    or on another number of ranks (an owner finds a marker, not the state: a
    resharding needs the full state dict); a full state dict broadcast from
    rank 0 (``broadcast_from_rank0=True``: torch hands the other ranks only
    the keys their current state has, so a matrix's state could come back
    incomplete); other param groups; whole tensors for the dense state of a
    sharded parameter (one process's state dict given to the sharded loader:
    load it with ``full_state_dict=True``, which shards it).
    """
    opt, name = optimizer, type(optimizer).__name__
    saved_groups = state_dict["param_groups"]
    same_groups = len(saved_groups) == len(opt.param_groups) and all(
        len(g["params"]) == len(s["params"]) for g, s in zip(opt.param_groups, saved_groups))
    keys = [i for s in saved_groups for i in s["params"]]  # the state dict's index of each parameter
    entries = [(p, state_dict["state"].get(k)) for p, k in zip((p for g in opt.param_groups for p in g["params"]), keys)]
    marker_only = lambda st: isinstance(st, dict) and "owner" in st and set(st) <= {"owner", "rank"}
    sharded = [p for p, _ in entries if is_dtensor(p)]
    if not sharded:
        for p, st in entries:
            if marker_only(st):
                raise ValueError(
                    f"{name}.load_state_dict: this state dict was written by one rank of an FSDP2 run: the state "
                    f"of the parameter of shape {tuple(p.shape)} is on rank {st['owner']}, not in it (each FSDP2 "
                    f"rank holds the states of the matrices it owns). {_RESUME_PATHS}. Nothing was loaded.")
        return {**state_dict, "state": {k: {n: v for n, v in st.items() if n != "owner"} if isinstance(st, dict)
                                        else st for k, st in state_dict["state"].items()}}
    shard_group, world, me = _shard_dim(_mesh_of(sharded))
    whole = _whole_entries(opt)
    owner = _owner_ranks(opt, world)
    held, whole_dense = {}, None  # what this rank's state dict holds of each parameter: "state", "marker", "mixed"
    for i, (p, st) in enumerate(entries):
        if isinstance(st, dict) and st:
            held[i] = "marker" if marker_only(st) else "mixed" if "owner" in st else "state"
        if i not in whole and is_dtensor(p) and isinstance(st, dict) and any(
                isinstance(v, Tensor) and v.dim() > 0 and not is_dtensor(v) for v in st.values()):
            whole_dense = whole_dense or tuple(p.shape)
    options = (_dcp_call(("set_optimizer_state_dict", "set_state_dict")) or {}).get("options")
    broadcast = bool(getattr(options, "full_state_dict", False) and getattr(options, "broadcast_from_rank0", False))
    every: list = [None] * world
    torch.distributed.all_gather_object(every, (broadcast, same_groups, held, whole_dense), group=shard_group)
    nothing = "Nothing was loaded on any rank."
    if not all(same for _, same, _, _ in every):
        raise ValueError(f"{name}.load_state_dict under FSDP2: the state dict's param groups differ from the "
                         f"optimizer's on rank {next(r for r, e in enumerate(every) if not e[1])}. {nothing}")
    if owner and any(e[0] for e in every):
        raise ValueError(
            f"{name}.load_state_dict under FSDP2: a full state dict broadcast from rank 0 (full_state_dict=True, "
            "broadcast_from_rank0=True) cannot restore the low-rank states: the other ranks receive only the keys "
            "of the states they hold now, and each matrix's state must reach its owner whole. "
            f"{_RESUME_PATHS}. {nothing}")
    if shape := next((e[3] for e in every if e[3]), None):
        raise ValueError(f"{name}.load_state_dict under FSDP2: the state dict holds whole tensors for the state of "
                         f"the sharded parameter of shape {shape}, as one process's does: load it with "
                         f"set_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)), which "
                         f"shards them. {nothing}")
    for i, (p, _) in enumerate(entries):
        seen, what, o = [h.get(i) for _, _, h, _ in every], f"the parameter of shape {tuple(p.shape)} (index {i})", \
            owner.get(i)
        problem = None
        if o is None and any(h in ("marker", "mixed") for h in seen):
            problem = f"rank {seen.index(next(h for h in seen if h in ('marker', 'mixed')))} has an owner " \
                      f"marker for {what}, which every rank steps on its own shard"
        elif o is not None and any(seen) and seen[o] != "state":
            problem = f"rank {o}, which steps {what} on {world} ranks, has " + \
                      ("no state for it" if seen[o] is None else "a marker putting its state on another rank")
        if problem:
            raise ValueError(
                f"{name}.load_state_dict under FSDP2: this state dict does not hold each low-rank state on the "
                f"rank that steps its matrix: {problem} (one rank's sharded state dict, of another number of "
                f"ranks, another rank's, or with other param groups). {_RESUME_PATHS}. {nothing}")
    state = dict(state_dict["state"])
    for i, k in ((i, keys[i]) for i in whole if isinstance(state_dict["state"].get(keys[i]), dict)):
        st = state[k]
        state[k] = ({n: v for n, v in st.items() if n != "owner"} if owner[i] == me else
                    {"owner": owner[i], **({"rank": st["rank"]} if "rank" in st else {})})
    return {**state_dict, "state": state}


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
        _check_layerwise(optimizer, group)  # refuse now, not inside the first backward

    def hook(p: Tensor) -> None:
        optimizer.step_parameter(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for g in optimizer.param_groups for p in g["params"]
            if p.requires_grad]  # a frozen parameter has no gradient and takes no hook


@torch.no_grad()
def step_parameter(optimizer: Optimizer, p: Tensor) -> None:
    """``optimizer.step_parameter(p)``: update the one parameter ``p`` now, exactly
    as ``step()`` would, from its post-accumulate-grad hook, so the whole model's
    gradients never exist at once. LR schedulers see the step; step hooks are
    not called."""
    groups = optimizer.param_groups  # load_state_dict puts new group dicts here: the table is rebuilt for them
    built, where = optimizer.__dict__.get("_where") or ([], {})  # dropped by add_param_group
    if len(built) != len(groups) or any(a is not b for a, b in zip(built, groups)) or len(where) != sum(
            len(g["params"]) for g in groups):
        where = {id(q): (g, i) for i, (g, q) in enumerate((g, q) for g in groups for q in g["params"])}
        optimizer.__dict__["_where"] = (list(groups), where)
    if id(p) not in where:
        raise ValueError(f"step_parameter: the tensor of shape {tuple(p.shape)} is not a parameter of this optimizer")
    group, index = where[id(p)]
    optimizer._opt_called = True  # what torch's step wrapper records, for LR schedulers
    _check_layerwise(optimizer, group)
    if p.grad is None:
        return
    if is_dtensor(p):
        fsdp2_step(optimizer, [(p, group, index)])
        return
    optimizer._check_grads([(p, group, index)])
    optimizer._step_items([(p, group, index)])


def _check_layerwise(optimizer: Optimizer, group: dict) -> None:
    """AdaptiveAdamW's allocation (a group with ``allocate``) needs every matrix at once."""
    if group.get("rank") is not None and group.get("allocate"):
        raise RuntimeError(f"{type(optimizer).__name__} cannot update one parameter at a time (layer-wise): its "
                           "allocation splits one rank budget using the spectra of all matrices at once. Use "
                           "allocate=False (fixed ranks) or GaLoreAdamW for layer-wise updates.")


# -- the richer messages of the core's refusals: whose option, whose state dict --------

_HINTS = {  # (optimizer, group option it refuses) -> what to do instead
    ("AdaptiveAdamW", "subspace"): "AdaptiveAdamW's allocation needs the spectra of the SVD, so its subspace is "
                                   "always the SVD's (use GaLoreAdamW for 'random' or 'gha')",
    ("LDAdam", "scale"): "LDAdam's update P N has no GaLore scale α; remove 'scale' (or multiply lr by it)",
    ("LDAdam", "update_proj_gap"): "LDAdam refreshes its subspace every step; remove 'update_proj_gap'",
    ("LDAdam", "error_dtype"): "it is a constructor argument, LDAdam(..., error_dtype=torch.bfloat16)",
}


def optimizer_options() -> dict[str, set[str]]:
    """Every optimizer class of lowrank_adam (subclasses too) -> its group options."""
    out, todo = {}, list(la._Base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        out[cls.__name__] = set(inspect.signature(cls.__init__).parameters) - {"self", "params"} | set(cls.group_keys)
    return out


def option_hint(optimizer: Optimizer, key: str) -> str:
    """What the refusal of group option ``key`` adds: whose option it is, and what to do."""
    owners = sorted(name for name, opts in optimizer_options().items() if key in opts)
    hint = _HINTS.get((type(optimizer).__name__, key), "remove it from the group")
    return f" ({'an option of ' + ', '.join(owners) if owners else 'unknown'}): {hint}"


def check_state_dict(optimizer: Optimizer, state_dict: dict) -> dict:
    """Before ``load_state_dict`` loads anything: the state dict to load (an older
    Adapprox state without ``u_exp`` holds U itself, at scale 4^0), a warning for
    an older one's generator states, and the name of the optimizer that wrote
    another's state dict."""
    name = type(optimizer).__name__
    if any(isinstance(s, dict) and "U" in s and "u_exp" not in s for s in state_dict["state"].values()):
        state_dict = {**state_dict, "state": {i: {**s, "u_exp": s["U"].new_zeros(())} if "U" in s and "u_exp" not in s
                                              else s for i, s in state_dict["state"].items()}}
    if "extra" in state_dict:  # written before the randomness became counter-based
        warnings.warn(f"{name}.load_state_dict: this state dict has the generator states of an older version, which "
                      "are ignored: the random sketches continue from counter-based seeds, so the run does not "
                      "continue bit-exactly", stacklevel=3)
    foreign = ({k for g in state_dict["param_groups"] for k in g} - set(optimizer.defaults)
               - set(optimizer.group_keys) - set(optimizer._bookkeeping_keys))
    writers = [w for w, options in optimizer_options().items() if foreign and foreign <= options]
    if writers:
        raise ValueError(f"{name}.load_state_dict: this state dict was written by {' or '.join(writers)} (its param "
                         f"groups hold {', '.join(sorted(foreign))}, which {name} does not have); nothing was loaded")
    return state_dict
