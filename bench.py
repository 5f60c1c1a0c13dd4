"""Compare runs of train_tiny_llama.py: optimizers side by side, step() timings,
optimizer-state memory, plots. Each subcommand prints a markdown table (or
writes PNGs); `python bench.py COMMAND --help` lists its flags. While it runs,
it says which run or measurement of how many is under way, with an ETA: a
progress bar on a terminal, else lines such as `run 3/10: galore seed 1 lr
0.01 (...)` on stderr, so that stdout holds the results alone.

commands:
  compare   train several runs from the same initial weights and data order and
            tabulate them: every optimizer of --optimizer (a comma list of
            train_tiny_llama.py specs) at each factor of --lr-sweep times its
            lr, for --seeds seeds, reported as the median over seeds ± half
            the range, with each optimizer at its best lr (--widen N: up to N
            more lrs past the sweep's edge while the best sits there). Every
            other flag goes to each run (--corpus packages: the second
            embedded corpus; the table's caption names the data).
  steps     time optimizer.step() alone on --model's attn/mlp matrices with
            random gradients: normal, first (state and exact SVD), refresh and
            amortized, against AdamW; --full-gap: every step of one refresh gap
            (median, slowest, slowest / median), e.g. galore against galore+stagger
  memory    optimizer state of every method for the 60m-1b shapes, from the
            per-matrix formulas (tested equal to state_bytes after a real step)
  peak      peak memory of whole training steps, each optimizer in a fresh
            process, with and without --layerwise (CUDA: max_memory_allocated;
            CPU: peak resident memory); also of the steps after the first (a
            later refresh) and step()'s own temporaries there
  shard     optimizer state and peak memory per rank under torchrun (--nproc processes, gloo on
            CPU): plain DDP (every rank holds all of it), --zero (ZeRO-1) and
            --fsdp (FSDP2), for each optimizer, after real steps on random tokens
  refresh   AdaptiveAdamW's refresh (SVD) step against GaLore's: time and the
            memory it adds (refresh_keep bounds it)
  sketch    Adapprox's S-RSI variants (warm/cold start, power iterations) on the
            very matrices one training run sketches: relative errors, paired
  subspaces GaLoreAdamW's or AdaptiveAdamW's refresh="randomized" against the exact
            SVD on the very gradients one run refreshes on: energy captured,
            time, and the allocation each spectrum gives; --kept SPEC,...: for
            GaLoreAdamW specs, the share of each step's gradient energy that the
            basis held since the last step keeps, against the best rank-r share
  sensitivity  how much AdamW, torch Adafactor and Adapprox (default, held ranks,
            full rank) amplify 1e-7 gradient noise at one step; full-rank Adapprox's
            distance from AdamW's trajectory
  trace     the reader's path: the functions of lowrank_adam.py that run inside
            opt.step() (one 24x40 matrix in a rank group, default options, the
            first step and an ordinary one) and their code lines (no blank,
            comment or docstring lines)
  copyout   the lines of one class copied out of lowrank_adam.py with what it
            needs: by the README's sections, and by the definitions it reaches
  loader    tokens per second of the data loader on one core, byte tokenizer
            and a BPE tokenizer trained on the corpus (needs tokenizers)
  plot      loss curves, AdaptiveAdamW's rank heatmap and Adapprox's ranks of
            the runs in --out-dir; with --results, final validation loss
            against optimizer state, one point per optimizer, from compare's
            results.json or a table of results (needs matplotlib, but for
            an --out ending in .svg)

examples:
  python bench.py compare --optimizer adamw,galore,adaptive --seeds 3 --rank 8
  python bench.py compare --optimizer adamw,galore+residual --lr-sweep 0.5,1,2 --out-dir out/sweep
  python bench.py compare --optimizer adamw,galore --rank 8 --corpus packages --out-dir out/packages
  python bench.py steps --model 60m --rank 128 --optimizer adamw,galore,adaptive,ldadam,adapprox
  python bench.py steps --model 60m --rank 128 --update-proj-gap 12 --full-gap --optimizer galore,galore+stagger
  python bench.py memory
  python bench.py peak --model 60m --rank 128 --batch-size 1 --seq-len 256
  python bench.py shard --model 60m --rank 128 --batch-size 1 --seq-len 64
  python bench.py refresh --model 350m --rank 256
  python bench.py subspaces --optimizer adaptive --rank 8 --update-proj-gap 20
  python bench.py subspaces --kept galore+residual,galore:gha+residual --rank 8 --out-dir out/kept
  python bench.py plot --out-dir out/compare
  python bench.py plot --results docs/tiny_results.json --out docs/loss_vs_state.svg
  python bench.py sensitivity --ranks 1,4,16
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from xml.sax.saxutils import escape

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

import llama_c4
import lowrank_adam as la
import lowrank_engine
import train_tiny_llama as tl

# ----------------------------------------------------------------------------- progress

class Progress:
    """Which of ``total`` runs or measurements is under way, and an ETA. On a
    terminal (llama_c4.interactive) a tqdm bar on stderr; otherwise a plain line on
    stderr as each one starts, such as ``run 3/10: galore seed 1 lr 0.01 (01:40
    elapsed, about 04:10 left)``; ``every``: only every Nth one (and the last).
    ``shown`` False (a DDP rank other than 0): nothing. A context manager: the bar
    ends with the block, however it ends."""
    def __init__(self, total: int, unit: str, desc: str, every: int = 1, shown: bool = True):
        self.total, self.unit, self.every, self.shown, self.i = total, unit, every, shown, 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, unit=unit.split()[-1], desc=desc, dynamic_ncols=True, file=sys.stderr) if (
            shown and llama_c4.interactive()) else None

    def start(self, what: str) -> None:
        """The next one begins (and the one before is done)."""
        if self.bar is not None:
            if self.i:
                self.bar.update()
            self.bar.set_postfix_str(what)
        elif self.shown and (self.i % self.every == 0 or self.i + 1 == self.total):
            done, elapsed = self.i, time.perf_counter() - self.started
            eta = (f" ({tqdm.format_interval(elapsed)} elapsed, about "
                   f"{tqdm.format_interval(elapsed / done * (self.total - done))} left)" if done else "")
            sys.stdout.flush()  # what was printed before comes before, also in `2>&1`
            print(f"{self.unit} {done + 1}/{self.total}: {what}{eta}", file=sys.stderr, flush=True)
        self.i += 1

    def write(self, message: str) -> None:
        """A line on stdout (above the bar, if one is shown)."""
        tl.say(message)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if self.bar is not None:
            if kind is None and self.i:
                self.bar.update()  # the last one is done too
            self.bar.close()

# ----------------------------------------------------------------------------- compare: runs side by side

def peak_lr(spec: str, flag: str | None) -> float:
    """compare's --lr for the run of ``spec``: a number, or NAME=LR pairs where the
    full spec wins over its base name; unset, the optimizer's default. Every entry
    is checked, also those no run of this compare uses."""
    name = tl.parse_optimizer(spec)[0]
    if flag is None:
        return tl.OPTIMIZERS[name].lr
    table = {spec: flag} if "=" not in flag else dict(item.partition("=")[::2] for item in flag.split(","))
    for key, value in table.items():
        tl.parse_optimizer(key)  # an unknown name is an error, not silently unused
        try:
            table[key] = float(value)
        except ValueError:
            raise ValueError(f"--lr {flag}: {value!r} is not a number") from None
        if not 0 < table[key] < math.inf:
            raise ValueError(f"--lr {flag}: a learning rate must be a number > 0, not {value}")
    return table.get(spec, table.get(name, tl.OPTIMIZERS[name].lr))

def sweep_factors(own) -> list[float]:
    try:
        factors = [float(f) for f in own.lr_sweep.split(",")]
    except ValueError:
        tl.fail(f"--lr-sweep {own.lr_sweep}: not a comma list of numbers")
    if not all(0 < f < math.inf for f in factors):
        tl.fail("compare needs --lr-sweep factors > 0")
    return factors

def plan_runs(own, rest: list[str], factors: dict | None = None) -> list:
    """The checked flags of every run: each spec x lr factor x seed, in its own folder. ``factors``:
    spec -> its lr factors, in place of --lr-sweep's for every spec (a widened sweep)."""
    specs = [s.strip() for s in own.optimizer.split(",") if s.strip()]
    if not specs or own.seeds < 1 or own.widen < 0:
        tl.fail("compare needs at least one --optimizer, --seeds >= 1 and --widen >= 0")
    if len(set(specs)) < len(specs):  # a spec twice would be its own seed again, not a second seed
        tl.fail(f"--optimizer {own.optimizer}: names a spec twice; for repeats use --seeds")
    try:  # (an unknown name is refused as such first)
        named = set(specs) | {tl.parse_optimizer(spec)[0] for spec in specs}
        unused = [key for key, _, _ in (item.partition("=") for item in (own.lr or "").split(",") if "=" in item)
                  if tl.parse_optimizer(key) and key not in named]
    except ValueError as e:
        tl.fail(str(e))
    if unused:
        tl.fail(f"--lr {own.lr}: {unused[0]} is not among --optimizer {own.optimizer}, so no run would use it")
    factors = factors if factors is not None else dict.fromkeys(specs, sweep_factors(own))
    runs = []
    for seed in range(own.seed, own.seed + own.seeds):
        for spec in specs:
            for factor in factors.get(spec, []):
                try:
                    lr = peak_lr(spec, own.lr) * factor
                except ValueError as e:
                    tl.fail(str(e))
                name = f"{spec}-seed{seed}" if factor == 1 else f"{spec}-lr{lr:g}-seed{seed}"
                runs.append(tl.parse_args([*rest, "--optimizer", spec, "--seed", str(seed), "--lr", repr(lr),
                                           "--out-dir", str(Path(own.out_dir) / name)]))
    return runs

def compare(argv: list[str]) -> list[dict]:
    p = tl.Parser(prog="bench.py compare", description="Runs side by side; any other flag (see train_tiny_llama.py "
                  "--help) goes to every run.", formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", default="adamw", help="comma list of optimizer specs, e.g. adamw,galore+residual")
    p.add_argument("--lr", help="a number, or NAME=LR pairs such as galore=2e-2,adamw=6e-3 (a full spec like "
                   "galore+residual=3e-2 wins over its name); unset: each optimizer's default")
    p.add_argument("--lr-sweep", default="1", help="comma list of factors on each optimizer's lr, e.g. 0.5,1,2")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="run seeds --seed ... --seed + N - 1")
    p.add_argument("--widen", type=int, default=0, help="up to N more lrs per optimizer: while its best lr (the "
                   "least median loss over the seeds) is the smallest or the largest tried, try one sweep step "
                   "beyond it (the sweep's own ratio between neighbouring factors; 2 for a single factor, which "
                   "moves up first)")
    p.add_argument("--out-dir", default="out/compare", help="one folder per run inside, and results.json")
    p.add_argument("--plot", action="store_true", help="also write the plots of `bench.py plot` (needs matplotlib)")
    own, rest = p.parse_known_args(argv)
    runs = plan_runs(own, rest)  # every run's flags checked before any trains
    if own.plot:
        import_pyplot()
    tokenizer = tl.load_tokenizer(runs[0])
    for args in runs:
        tl.check_out_dir(args)
        llama_c4.resume_checkpoint(args)  # refuses a mismatched resume now, not after hours of other runs
    dist = tl.setup_distributed(runs[0])
    data, val = tl.load_data(runs[0], tokenizer, dist)
    results, diverged, failed, widened, first = [], [], [], {}, runs[0]
    try:
        while runs:
            with Progress(len(runs), "run", "compare" if not widened else "widen", shown=dist.master) as progress:
                for args in runs:
                    progress.start(f"{args.optimizer} seed {args.seed} lr {args.lr:g}")
                    ckpt = llama_c4.resume_checkpoint(args)
                    try:
                        results.append(tl.train(args, data, val, dist, ckpt))
                    except tl.Diverged as e:  # an lr too large (a sweep's largest, say): the other runs go on
                        diverged.append(f"{args.optimizer} seed {args.seed} lr {args.lr:g} at step {e.step}")
                        failed.append((args.optimizer, args.lr))
                        if dist.master:
                            progress.write(f"{args.optimizer} seed {args.seed} lr {args.lr:g}: {e}")
                        continue
                    if dist.master:
                        saved = " (complete before: the saved result)" if ckpt is not None and ckpt["result"] else ""
                        progress.write(tl.describe(results[-1]) + saved)
            runs = widen(own, rest, results, failed, widened)
            for args in runs:
                tl.check_out_dir(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except llama_c4.DataError as e:
        tl.fail(str(e))
    if dist.master:
        if skipped := data.stats.report():
            print(skipped)
        if results:
            print(f"on {llama_c4.corpus_name(first)}, tokenizer {tokenizer.name}:")
            print(summarize(results))
        if diverged:
            print(f"diverged, so not in the table: {', '.join(diverged)}")
        if not results:
            tl.fail("every run diverged: lower --lr")
        (Path(own.out_dir) / "results.json").write_text(json.dumps(results, indent=1))
        if own.plot:
            for path in make_plots(Path(own.out_dir)):
                print(f"wrote {path}")
    return results

def widen(own, rest: list[str], results: list[dict], failed: list[tuple], widened: dict) -> list:
    """The runs one more lr beyond the edge of each spec's sweep where its best lr (the least median
    loss over seeds; a diverged run counts as an infinite loss) is the smallest or the largest lr tried,
    at most --widen times per spec: the best lr of a sweep must lie inside it. The step is the sweep's
    own (geometric mean ratio of neighbouring factors), 2 for a single factor (a lone lr is the
    largest tried, so it moves up first). ``widened``: spec ->
    how often so far, updated. Prints which edge moved."""
    factors = sweep_factors(own)
    step = (max(factors) / min(factors)) ** (1 / (len(factors) - 1)) if len(set(factors)) > 1 else 2.0
    losses: dict[str, dict[float, list[float]]] = {}
    for r in results:
        losses.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(r["val_loss"])
    for name, lr in failed:
        losses.setdefault(name, {}).setdefault(lr, []).append(math.inf)
    more = {}
    for spec, by_lr in losses.items():
        if widened.get(spec, 0) >= own.widen:
            continue
        best = min(by_lr, key=lambda lr: statistics.median(by_lr[lr]))
        if not math.isfinite(statistics.median(by_lr[best])):
            continue  # every lr diverged: nothing to widen from
        edge = step if best == max(by_lr) else 1 / step if best == min(by_lr) else None
        if edge is None:
            continue
        base = peak_lr(spec, own.lr)
        more[spec] = [best * edge / base]
        widened[spec] = widened.get(spec, 0) + 1
        tl.say(f"widen: {spec}'s best lr {best:g} is the {'largest' if edge > 1 else 'smallest'} tried; "
               f"trying {best * edge:g}")
    return plan_runs(own, rest, more) if more else []

def summarize(results: list[dict]) -> str:
    """Markdown: one row per (optimizer, lr) with medians over seeds (± half the
    range); with an lr sweep, a second table keeps each optimizer's best lr."""
    by_run: dict[tuple, list[dict]] = {}
    for r in results:
        by_run.setdefault((r["optimizer"], r["lr"]), []).append(r)
    med = lambda rs, key: statistics.median(r[key] for r in rs)
    best = {}
    for (name, lr), rs in by_run.items():
        if name not in best or med(rs, "val_loss") < med(by_run[best[name]], "val_loss"):
            best[name] = (name, lr)
    ref = by_run.get(best["adamw"]) if "adamw" in best else None
    cuda = any(r["peak_cuda_gb"] is not None for r in results)
    cols = ["optimizer", "lr", "seeds", "val loss", "val ppl", "Δ loss vs AdamW", "state MB", "% of AdamW",
            "step() ms", "tokens/s"] + (["peak CUDA GB"] if cuda else [])

    def table(keys):
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for key in keys:
            rs = by_run[key]
            loss = med(rs, "val_loss")
            spread = (max(r["val_loss"] for r in rs) - min(r["val_loss"] for r in rs)) / 2
            row = [key[0], f"{key[1]:g}", str(len(rs)), f"{loss:.4f}" + (f" ± {spread:.4f}" if len(rs) > 1 else ""),
                   f"{math.exp(loss):.3f}", f"{loss - med(ref, 'val_loss'):+.4f}" if ref else "",
                   f"{med(rs, 'state_mb'):.3f}",
                   f"{100 * med(rs, 'state_mb') / med(ref, 'state_mb'):.1f}" if ref else "",
                   f"{med(rs, 'step_ms'):.2f}", f"{med(rs, 'tokens_per_s'):,.0f}"]
            lines.append("| " + " | ".join(row + ([f"{med(rs, 'peak_cuda_gb'):.2f}"] if cuda else [])) + " |")
        return "\n".join(lines)

    if len(by_run) == len(best):
        return table(list(by_run))
    return ("all learning rates:\n" + table(list(by_run)) + "\n\neach optimizer at its best lr:\n"
            + table(list(best.values())))

# ----------------------------------------------------------------------------- steps: step() time per method

def time_steps(opt, params, grads, count: int, device: torch.device, replaced: list | None = None) -> list[float]:
    """Seconds of each of ``count`` calls of opt.step() on the fixed gradients; ``replaced``: each
    step's number of matrices whose basis ``P`` it replaced (a refresh) is appended there."""
    times = []
    for _ in range(count):
        for p, g in zip(params, grads):
            p.grad = g
        before = [opt.state.get(p, {}).get("P") for p in params]
        tl.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        tl.synchronize(device)
        times.append(time.perf_counter() - t0)
        if replaced is not None:
            replaced.append(sum(opt.state.get(p, {}).get("P") is not b for p, b in zip(params, before)))
    return times

def shared_args(rest: list[str]):
    """The flags every run of steps, peak or shard shares, --rank resolved (adapprox alone may leave
    it unset), parsed as AdamW's: --stagger, an option of some optimizers only, is checked with each
    spec instead."""
    return tl.parse_args([a for a in rest if a != "--stagger"])

def steps(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py steps", description="step() time on --model's attn/mlp matrices; any other flag "
                  "(see train_tiny_llama.py --help: --model, --rank, --device, optimizer options) applies too.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", default="adamw,galore,adaptive,ldadam,adapprox", help="comma list of specs")
    p.add_argument("--steps", type=int, default=5, help="normal steps timed (their median is reported)")
    p.add_argument("--all-params", action="store_true", help="every parameter of the model, the dense ones too "
                   "(embeddings, norms, head: plain AdamW in the low-rank optimizers), not only the attn/mlp matrices")
    p.add_argument("--full-gap", action="store_true", help="time every step of one refresh gap instead: the T = "
                   "--update-proj-gap steps after the first (steps 2 to T+1, in which every matrix refreshes once: "
                   "all at step T+1, or spread over them with +stagger), reporting their median, the slowest and "
                   "slowest / median; --steps is then not used")
    own, rest = p.parse_known_args(argv)
    if own.steps < 1:
        tl.fail(f"--steps {own.steps}: must be an integer >= 1")
    runs = [tl.parse_args([*rest, "--optimizer", spec]) for spec in own.optimizer.split(",")]
    common = shared_args(rest)
    device = torch.device("cuda" if common.device == "auto" and torch.cuda.is_available() else
                          "cpu" if common.device == "auto" else common.device)
    llama_c4.set_threads(common, device.type)
    with Progress(1 + len(runs), "measurement", "steps") as progress:
        progress.start(f"build the {common.model} model and its random gradients")
        torch.manual_seed(common.seed)
        model = tl.build_model(common, 320, device)
        groups = la.lowrank_groups(model, common.rank)
        params = [p for g in groups for p in g["params"]] if own.all_params else groups[-1]["params"]
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        rows, gap = {}, None
        for args in runs:
            calls = (common.update_proj_gap or default_gap()) + 1 if own.full_gap else own.steps + 2
            progress.start(f"{args.optimizer}: {calls} step() calls")
            measure = time_full_gap if own.full_gap else time_optimizer
            rows[args.optimizer], gap = measure(args, own, groups, params, grads, device)
    what = f"all {len(params)} tensors" if own.all_params else f"the {len(params)} attn/mlp matrices"
    if own.full_gap:
        return full_gap_table(rows, common, what, device, gap)
    staggered = [a.optimizer for a in runs if tl.optimizer_options(a)[1].get("stagger")]
    return steps_table(rows, common, what, device, own.steps, gap) + (
        f"\n\n{', '.join(staggered)}: with stagger every step refreshes some of the matrices (here over a gap of "
        f"{own.steps + 1}), so normal and refresh mix them; --full-gap times a whole gap" if staggered else "")

def default_gap() -> int:
    return inspect.signature(la.GaLoreAdamW).parameters["update_proj_gap"].default

def timed_optimizer(args, own, groups, params, update_proj_gap: int) -> tuple[torch.optim.Optimizer, bool, int]:
    """steps' optimizer of ``args`` on the matrices (``update_proj_gap`` for one that refreshes), whether
    it refreshes, and the gap T its flags give (or GaLore's default)."""
    recipe, kwargs = tl.optimizer_options(args)
    refreshes = "update_proj_gap" in inspect.signature(recipe.cls).parameters
    gap = kwargs.get("update_proj_gap", default_gap())
    kwargs.update(lr=1e-5, **({"update_proj_gap": update_proj_gap} if refreshes else {}),
                  **({"foreach": True} if recipe.cls is torch.optim.AdamW else {}))
    lowrank = groups if own.all_params else [{"params": params, "rank": args.rank}]
    capped = params if tl.rank_cap(args) is None else [  # adapprox: its matrices' ranks capped
        {"params": [p for p in params if p.dim() == 2], "rank": tl.rank_cap(args)},
        {"params": [p for p in params if p.dim() != 2]}]
    return recipe.cls(lowrank if recipe.lowrank else capped, **kwargs), refreshes, gap

def time_full_gap(args, own, groups, params, grads, device) -> tuple[tuple, int]:
    """steps --full-gap's measurement of one optimizer: (first ms, the T steps after it in ms, and the
    number of bases each replaced, None if it never refreshes), and T. In steps 2..T+1 every matrix
    refreshes once: all at step T+1 in the papers' schedule, matrix i at step 2 + ((i - 1) mod T)
    with stagger."""
    gap = args.update_proj_gap or default_gap()
    opt, refreshes, _ = timed_optimizer(args, own, groups, params, gap)
    replaced = []
    first, *times = time_steps(opt, params, grads, gap + 1, device, replaced)
    return (1e3 * first, [1e3 * t for t in times], replaced[1:] if refreshes else None), gap

def full_gap_table(rows: dict, args, what: str, device, gap: int) -> str:
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    adamw = rows.get("adamw")
    lines = [f"step() on {what} of {args.model} (rank {args.rank}, {device}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads); each of the T = {gap} steps after the first (steps 2 to {gap + 1}, "
             f"in which every matrix refreshes once); first = step 1 (state allocated, bases by exact SVD); "
             f"mean = the step amortized over the gap", "",
             "| optimizer | first ms | median ms | slowest ms | slowest at step | slowest / median | mean ms | "
             "mean / AdamW | most bases refreshed in a step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (first, times, replaced) in rows.items():
        median, slowest, mean = statistics.median(times), max(times), statistics.fmean(times)
        cells = [fmt(first), fmt(median), fmt(slowest), str(2 + times.index(slowest)), fmt(slowest / median),
                 fmt(mean), fmt(None if adamw is None else mean / statistics.fmean(adamw[1])),
                 "–" if replaced is None else str(max(replaced))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def time_optimizer(args, own, groups, params, grads, device) -> tuple[tuple, int]:
    """steps' measurement of one optimizer: (normal, first, refresh, amortized ms), and its refresh gap.
    The first step allocates the state (and computes the first bases by exact SVD); the refresh
    is the step after the normal ones (step T+1), which has a previous basis to start from."""
    opt, refreshes, gap = timed_optimizer(args, own, groups, params, own.steps + 1)
    first, *normal = time_steps(opt, params, grads, own.steps + 1, device)
    normal_ms = 1e3 * statistics.median(normal)
    refresh_ms = 1e3 * time_steps(opt, params, grads, 1, device)[0] if refreshes else None  # step steps+2
    amortized = (refresh_ms + (gap - 1) * normal_ms) / gap if refreshes else normal_ms
    return (normal_ms, 1e3 * first, refresh_ms, amortized), gap

def steps_table(rows: dict, args, what: str, device, count: int, gap: int) -> str:
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    adamw = rows.get("adamw")
    lines = [f"step() on {what} of {args.model} (rank {args.rank}, {device}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads); median of {count} normal steps; first = step "
             f"1 (state allocated, bases by exact SVD); refresh = a later refresh step, amortized over T = {gap}", "",
             "| optimizer | normal ms | first ms | refresh ms | amortized ms | refresh / normal | normal / AdamW | "
             "amortized / AdamW |", "|---|---|---|---|---|---|---|---|"]
    for name, (normal, first, refresh, amortized) in rows.items():
        ratios = [None if refresh is None else refresh / normal,
                  None if adamw is None else normal / adamw[0], None if adamw is None else amortized / adamw[3]]
        lines.append(f"| {name} | " + " | ".join(map(fmt, (normal, first, refresh, amortized, *ratios))) + " |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- peak: memory of whole training steps

def resident_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))

def peak_one(argv: list[str]) -> None:
    """One measurement in this (fresh) process: prints a JSON line. On CUDA the
    peak is torch.cuda.max_memory_allocated; on CPU the peak resident memory
    (VmHWM) minus the resident memory before the model existed. The peak is
    reset before each step: ``peak`` is that of every step, ``later`` that of
    steps 2 and after (None for one step), which leaves out step 1 (the state
    allocated, every basis computed) and so shows a later refresh step's, e.g.
    with --update-proj-gap 4 --max-steps 5. ``step_temporaries``: of steps 2 and
    after, the most that opt.step() holds at once in the tensors it creates
    (LiveTensorBytes: exact on the CPU too, where the allocator keeps freed
    pages; a refresh's temporaries, not LAPACK's workspace); None with
    --layerwise or one step."""
    args = tl.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    llama_c4.set_threads(args, device.type)
    baseline = resident_kb("VmRSS") * 1024
    torch.manual_seed(args.seed)
    model = tl.build_model(args, 32000, device)
    opt = tl.build_optimizer(args, model)
    if args.layerwise:
        lowrank_engine.layerwise_hooks(opt)
    tokens = torch.randint(0, 32000, (args.batch_size, args.seq_len + 1), device=device)
    if device.type == "cuda":
        baseline = 0
    peaks, temporaries = [], []
    for step in range(1, args.max_steps + 1):  # step 1 also allocates the state and computes the first bases
        tl.synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        if not args.layerwise:
            if step == 1:
                opt.step()
            else:
                state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
                with LiveTensorBytes(state) as live:
                    del state
                    opt.step()
                temporaries.append(live.peak)
            opt.zero_grad(set_to_none=True)
        tl.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                     resident_kb("VmHWM") * 1024 - baseline)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(optimizer=args.optimizer, layerwise=args.layerwise, params=param_bytes,
                          grads=0 if args.layerwise else param_bytes, state=la.state_bytes(opt), peak=max(peaks),
                          later=max(peaks[1:], default=None), step_temporaries=max(temporaries, default=None),
                          device=str(device))))

def peak(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py peak", description="Peak memory of --max-steps training steps (random tokens), each "
                  "optimizer in a fresh process, with and without --layerwise; also the peak of the steps after the "
                  "first and the most opt.step() holds at once in new tensors there, which show a later refresh step's "
                  "(e.g. --update-proj-gap 4 --max-steps 5: step 5 refreshes every basis, or with +stagger each "
                  "step 2-5 a quarter of them); any other flag (see train_tiny_llama.py --help: --model, --rank, "
                  "--batch-size, --seq-len, --device) applies too.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", default="adamw,galore,adaptive,ldadam,adapprox", help="comma list of specs")
    p.add_argument("--modes", default="plain,layerwise", help="plain (optimizer.step() after backward), layerwise")
    own, rest = p.parse_known_args(argv)
    rest = ["--grad-clip", "0", "--max-steps", "3", *rest]  # clipping is not part of what is measured
    plan = []
    for spec in own.optimizer.split(","):
        for mode in own.modes.split(","):
            flags = [*rest, "--optimizer", spec] + (["--layerwise"] if mode == "layerwise" else [])
            if mode == "layerwise":
                try:
                    tl.parse_args(flags)  # its check_memory_modes refuses what --layerwise cannot do
                except SystemExit:  # e.g. adaptive: no layer-wise mode
                    continue
            plan.append((f"{spec} {mode}", flags))
    rows = []
    with Progress(len(plan), "run", "peak") as progress:
        for what, flags in plan:
            progress.start(what)
            out = subprocess.run([sys.executable, __file__, "peak-one", *flags], capture_output=True, text=True)
            if out.returncode:
                tl.fail(f"peak-one {' '.join(flags)} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    args = shared_args(rest)
    mb = lambda b: "–" if b is None else f"{b / 2**20:,.0f}"
    mb1 = lambda b: "–" if b is None else f"{b / 2**20:,.1f}"
    later = f"steps 2-{args.max_steps}" if args.max_steps > 2 else "step 2"
    lines = [f"peak memory of {args.max_steps} training steps of {args.model} (batch {args.batch_size} x "
             f"{args.seq_len} tokens, rank {args.rank}, {rows[0]['device']}, torch {torch.__version__}); MB", "",
             "| optimizer | mode | params | grads | optimizer state | peak | peak - params - state (grads, "
             f"activations, temporaries) | peak / AdamW's | peak of {later} | step() temporaries, {later} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r["peak"] for r in rows if r["optimizer"] == "adamw" and not r["layerwise"]), None)
    for r in rows:
        ratio = f"{r['peak'] / base:.2f}" if base else ""
        lines.append(f"| {r['optimizer']} | {'layerwise' if r['layerwise'] else 'plain'} | {mb(r['params'])} | "
                     f"{mb(r['grads'])} | {mb(r['state'])} | {mb(r['peak'])} | "
                     f"{mb(r['peak'] - r['params'] - r['state'])} | {ratio} | {mb(r['later'])} | "
                     f"{mb1(r['step_temporaries'])} |")
    return "\n".join(lines)

class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the tensors that ops create and Python still holds, and
    their peak. Exact where resident memory is not (the allocator keeps freed
    pages), but blind to a kernel's internal workspace (LAPACK's, for an SVD).
    A storage counts from the op that creates it (one sharing no input's
    storage) until the last tensor object that views it is collected;
    ``existing`` tensors count from the start, so ``peak`` is the peak above
    the start and a replaced state tensor is no longer counted."""
    def __init__(self, existing=()):
        super().__init__()
        self.refs, self.size, self.now, self.peak = {}, {}, 0, 0
        for t in existing:  # tensors from before: their release lowers ``now`` below the start
            self._hold(t)

    def _hold(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in inputs:  # an in-place op on a tensor it does not track
                    continue
                self.now += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.now)
            self._hold(t)
        return out

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.size.pop(key)
            del self.refs[key]

def refresh_one(argv: list[str]) -> None:
    """AdaptiveAdamW's or GaLore's refresh on --model's attn/mlp matrices with
    random gradients, in this fresh process; prints a JSON line. Step 1 (every
    matrix's SVD, and the state allocated) is timed, with the peak resident
    memory it adds (VmHWM); step 2, a refresh too, with the peak of the
    tensors it creates and holds (LiveTensorBytes): the refresh's own
    temporaries, the state being there already."""
    own = argv[0]  # "galore", "adaptive" or "adaptive-keep-all"
    args = tl.parse_args(argv[1:])
    llama_c4.set_threads(args, "cpu")
    torch.manual_seed(args.seed)
    params = la.lowrank_groups(tl.build_model(args, 320), args.rank)[-1]["params"]
    g = torch.Generator().manual_seed(0)
    for p in params:  # gradients with a decaying spectrum, as real ones have: random factors times 1/i
        k = min(p.shape)
        p.grad = (torch.randn(p.shape[0], k, generator=g) / torch.arange(1, k + 1)) @ torch.randn(k, p.shape[1], generator=g)
    group = [{"params": params, "rank": args.rank, "update_proj_gap": 1}]
    opt = la.GaLoreAdamW(group) if own == "galore" else la.AdaptiveAdamW(group, refresh_keep=None if own.endswith(
        "keep-all") else 2.0)
    before = resident_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - t0
    extra = resident_kb("VmHWM") * 1024 - before
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    with LiveTensorBytes(state) as live:
        del state
        opt.step()
    print(json.dumps(dict(optimizer=own, seconds=seconds, extra=extra, live_peak=live.peak, matrices=len(params),
                          bases=sum(st["P"].numel() * 4 for st in opt.state.values()),
                          state=la.state_bytes(opt), max_rank=max(opt.ranks()))))

def refresh(argv: list[str]) -> str:
    """AdaptiveAdamW's refresh against GaLore's: time and memory."""
    p = tl.Parser(prog="bench.py refresh", description="The SVD steps of galore and adaptive on --model's "
                  "attn/mlp matrices, each in a fresh process, on CPU: the first step's seconds and the resident "
                  "memory it adds (the state included), and the tensors a later refresh holds at its peak (its "
                  "temporaries). Other flags: --model, --rank, --threads.", formatter_class=tl.HelpFormatter,
                  allow_abbrev=False)
    own, rest = p.parse_known_args(argv)
    rows, names = [], ("galore", "adaptive-keep-all", "adaptive")
    with Progress(len(names), "run", "refresh") as progress:
        for name in names:
            progress.start(name)
            out = subprocess.run([sys.executable, __file__, "refresh-one", name, *rest], capture_output=True,
                                 text=True)
            if out.returncode:
                tl.fail(f"refresh-one {name} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    args = tl.parse_args(rest)
    lines = [f"refresh (SVD) steps on the {rows[0]['matrices']} attn/mlp matrices of {args.model}, rank "
             f"{args.rank}, CPU, {torch.get_num_threads()} threads", "",
             "| optimizer | step 1, seconds | / galore | step 1: resident memory added, MB | a later refresh: "
             "peak of the tensors it holds, MB | state, MB (bases P) | largest rank |", "|---|---|---|---|---|---|---|"]
    names = {"galore": "GaLoreAdamW", "adaptive-keep-all": "AdaptiveAdamW, refresh_keep=None (every vector kept)",
             "adaptive": "AdaptiveAdamW, refresh_keep=2 (default)"}
    mb = lambda b: f"{b / 2**20:,.1f}"
    for r in rows:
        lines.append(f"| {names[r['optimizer']]} | {r['seconds']:.3g} | {r['seconds'] / rows[0]['seconds']:.2f} | "
                     f"{mb(r['extra'])} | {mb(r['live_peak'])} | {mb(r['state'])} ({mb(r['bases'])}) | "
                     f"{r['max_rank']} |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- sketch: S-RSI accuracy along a run

SKETCHES = {"warm, 1 iteration (default)": dict(warm=True, power_iters=1),
            "warm, 0 iterations": dict(warm=True, power_iters=0),
            "cold, 1 iteration": dict(warm=False, power_iters=1),
            "cold, 5 iterations (paper)": dict(warm=False, power_iters=5)}

def sketch(argv: list[str]) -> str:
    """Train one Adapprox run; at every step, sketch the very V the optimizer
    sketches with each S-RSI variant too, and compare their relative errors ξ
    (paired: the same V, rank and oversampling) with the optimum of that rank
    (the truncated SVD, Eckart-Young). --optimizer may name an Adapprox variant
    (e.g. adapprox+noscaling+float32); unset: adapprox."""
    p = tl.Parser(prog="bench.py sketch", description=" ".join(sketch.__doc__.split()) + " Other flags as "
                  "train_tiny_llama.py (--model, --rank, --max-steps, ...).", formatter_class=tl.HelpFormatter,
                  allow_abbrev=False)
    args = tl.parse_args(["--optimizer", "adapprox", *p.parse_known_args(argv)[1], "--quiet"])
    if tl.parse_optimizer(args.optimizer)[0] != "adapprox":
        tl.fail(f"bench.py sketch: --optimizer {args.optimizer}: sketches Adapprox's V; name adapprox or a variant")
    srsi, errors = la.srsi, {name: [] for name in ["optimal", *SKETCHES]}

    def paired(V, rank, oversample=5, power_iters=1, generator=None, init=None, omega=None):
        g = torch.Generator(device=V.device).manual_seed(len(errors["optimal"]))
        for name, how in SKETCHES.items():
            U = srsi(V, rank, oversample, how["power_iters"], g, init if how["warm"] else None)[1]
            errors[name].append(la.srsi_relative_error(V, U).item())
        s = torch.linalg.svdvals(V.double())
        errors["optimal"].append((s[rank:].square().sum() / s.square().sum().clamp_min(1e-300)).sqrt().item())
        return srsi(V, rank, oversample, power_iters, generator, init, omega)  # what the optimizer uses, unchanged

    la.srsi = paired
    try:
        tl.check_out_dir(args)
        dist = tl.setup_distributed(args)
        data, val = tl.load_data(args, tl.load_tokenizer(args), dist)
        with Progress(args.max_steps, "training step", "sketch", every=max(1, args.max_steps // 10),
                      shown=dist.master) as progress:  # (--quiet: the run shows no progress of its own)
            def next_step(run=None):  # before the first step, and after each but the last
                if run is None or run.step < args.max_steps:
                    progress.start(f"{len(errors['optimal'])} sketches so far")
            next_step()
            result = tl.train(args, data, val, dist, on_step=next_step)
    finally:
        la.srsi = srsi
    lines = [f"relative error ξ = ||V - Q Uᵀ|| / ||V|| of every Adapprox sketch of one run ({args.model}, "
             f"{args.max_steps} steps on {llama_c4.corpus_name(args)}, {tl.optimizer_options(args)[1]}; val loss "
             f"{result['val_loss']:.4f}), {len(errors['optimal'])} sketches", "",
             "| S-RSI | mean ξ | median ξ | 95th percentile | ≤ cold 5-iteration ξ + 1e-4 |", "|---|---|---|---|---|"]
    cold = errors["cold, 5 iterations (paper)"]
    for name, xs in errors.items():
        q = statistics.quantiles(xs, n=20)[-1]
        share = sum(x <= c + 1e-4 for x, c in zip(xs, cold)) / len(xs)
        lines.append(f"| {name} | {statistics.mean(xs):.5f} | {statistics.median(xs):.5f} | {q:.5f} | "
                     f"{100 * share:.1f} % |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- subspaces: randomized vs exact refresh

def subspaces(argv: list[str]) -> str:
    """Train one GaLoreAdamW or AdaptiveAdamW run with refresh="randomized";
    at every refresh after the first, also compute the exact SVD of the very
    gradient the optimizer refreshes on, and compare: the share of the
    gradient's energy the new basis captures against the exact top-r basis's,
    the time of each, and (AdaptiveAdamW) the allocation each spectrum gives.
    With --kept, instead, the energy of each new gradient that the basis held
    since the last step keeps, for several GaLoreAdamW specs (``kept``)."""
    p = tl.Parser(prog="bench.py subspaces", description=" ".join(subspaces.__doc__.split()) + " Other flags as "
                  "train_tiny_llama.py (--model, --rank, --update-proj-gap, --max-steps, ...).",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", choices=["galore", "adaptive"],
                   help="whose refresh to measure (with refresh=\"randomized\"); unset: adaptive")
    p.add_argument("--kept", metavar="SPEC,SPEC,...", help="instead: the energy each basis keeps between "
                   "refreshes. One run per GaLoreAdamW spec (e.g. galore+residual,galore:gha+residual); at every "
                   "step t >= 2 and for every low-rank matrix, e = ||B^T G_t||^2 / ||G_t||^2 with B the basis held "
                   "after step t-1 (before step t's refresh, if any), on the side the matrix projects, and o = the "
                   "best any basis of that rank keeps (the top r of G_t's squared singular values over their sum). A "
                   "table of their medians and 5th percentiles, e/o also at the refresh steps t = 1 (mod T), the "
                   "steps t = 2 (mod T) after them and the others; every step's numbers in --out-dir/kept.json; "
                   "each run trains in --out-dir/SPEC")
    own, rest = p.parse_known_args(argv)
    if own.kept is not None:
        if own.optimizer is not None:
            tl.fail("bench.py subspaces: --kept names its own optimizers: drop --optimizer")
        return kept(own.kept, rest)
    own.optimizer = own.optimizer or "adaptive"
    args = tl.parse_args([*rest, "--optimizer", f"{own.optimizer}+randomized", "--quiet"])
    energy, times, calls, allocations = [], {"randomized": [], "svd": []}, [], []
    randomized = la.randomized_spectrum

    def paired(x, width, warm, generator, power_iters=1):
        start = time.perf_counter()
        U, S = randomized(x, width, warm, generator, power_iters)
        times["randomized"].append(time.perf_counter() - start)
        start = time.perf_counter()
        U_exact, S_exact = la.gradient_spectrum(x)
        times["svd"].append(time.perf_counter() - start)
        r = warm.shape[1]
        captured = lambda B: torch.linalg.vector_norm(B.T @ x).square().item()
        energy.append(captured(U[:, :r]) / max(captured(U_exact[:, :r]), 1e-300))
        calls.append((S.tolist(), S_exact.tolist(), torch.linalg.vector_norm(x).square().item(), min(x.shape)))
        return U, S

    step_items = la.AdaptiveAdamW._step_items

    def compared(self, items, peers=None):
        calls.clear()
        step_items(self, items, peers)
        due = [(p, g) for p, g, _ in items if g.get("rank") is not None]  # all refresh together (no stagger)
        if calls and len(calls) == len(due) and all(g["allocate"] for _, g in due):
            budget = sum(min(g["rank"], min(p.shape)) for p, g in due)  # B = Σ the group's rank, clamped
            metric = due[0][1]["rank_metric"]
            caps = [c for *_, c in calls]
            sketched = la.allocate_ranks([s for s, *_ in calls], budget, caps, metric, [e for *_, e, _ in calls])
            exact = la.allocate_ranks([s for _, s, *_ in calls], budget, caps, metric)
            allocations.append((sketched, exact))

    la.randomized_spectrum, la.AdaptiveAdamW._step_items = paired, compared
    try:
        tl.check_out_dir(args)
        dist = tl.setup_distributed(args)
        result = tl.train(args, *tl.load_data(args, tl.load_tokenizer(args), dist), dist)
    finally:
        la.randomized_spectrum, la.AdaptiveAdamW._step_items = randomized, step_items
    if not energy:
        tl.fail("no refresh after the first one happened: use --max-steps > --update-proj-gap")
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]
    lines = [f"refresh=\"randomized\" against the exact SVD on the same gradients: {own.optimizer}, {args.model}, "
             f"rank {args.rank}, {args.max_steps} steps on {llama_c4.corpus_name(args)}, "
             f"T = {tl.optimizer_options(args)[1].get('update_proj_gap', 200)}, val loss "
             f"{result['val_loss']:.4f}; {len(energy)} refreshes of one matrix", "",
             "| measure | median | 5th percentile | worst |", "|---|---|---|---|",
             f"| energy captured / the exact top-r basis's | {statistics.median(energy):.5f} | "
             f"{pct(energy, 5):.5f} | {min(energy):.5f} |",
             f"| time, randomized / exact SVD | "
             f"{statistics.median(a / b for a, b in zip(times['randomized'], times['svd'])):.3f} | – | – |"]
    if allocations:
        same = sum(a == b for a, b in allocations)
        moved = [sum(abs(x - y) for x, y in zip(a, b)) / 2 / sum(b) for a, b in allocations]
        lines += ["", f"allocations: {same} of {len(allocations)} equal to the exact SVD's; rank moved to another "
                  f"matrix: median {100 * statistics.median(moved):.1f} %, worst {100 * max(moved):.1f} % of the budget"]
    return "\n".join(lines)

def percentile(xs: list[float], q: int) -> float:
    """The q-th percentile of xs, never outside its range (statistics' inclusive method)."""
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]

def kept_energy(G: torch.Tensor, P: torch.Tensor, transposed: bool) -> tuple[float, float] | None:
    """(e, o) for a gradient G (m×n, in the weight's layout) and a basis P of rank r:
    e = ||Pᵀ G||² / ||G||² for a left basis (P m×r), ||G P||² / ||G||² for a right one
    (``transposed``: P n×r), the span of P taken orthonormal in float64; o = the most any
    rank-r basis keeps, the top r of G's squared singular values over their sum (exact SVD,
    float64). None for an all-zero G."""
    G = G.double()
    if P.shape[0] != G.shape[1 if transposed else 0]:
        raise ValueError(f"a basis of shape {tuple(P.shape)} does not fit the {'right' if transposed else 'left'} "
                         f"side of a {tuple(G.shape)} gradient")
    Q = torch.linalg.qr(P.double()).Q
    s2 = torch.linalg.svdvals(G).square()
    if s2.sum() == 0:
        return None
    inside = (G @ Q if transposed else Q.T @ G).square().sum()
    return (inside / s2.sum()).item(), (s2[:P.shape[1]].sum() / s2.sum()).item()

def kept(specs: str, rest: list[str]) -> str:
    """bench.py subspaces --kept: one run per GaLoreAdamW spec; before each step of each low-rank
    matrix (GaLoreAdamW._update, where the gradient and the basis of the last step are both at hand),
    the energy the held basis keeps of the new gradient and the most any basis of its rank could."""
    specs = list(dict.fromkeys(s.strip() for s in specs.split(",") if s.strip()))
    base = tl.parse_args([*rest, "--quiet"])
    runs = []
    for spec in specs:
        try:
            name = tl.parse_optimizer(spec)[0]
        except ValueError as e:
            tl.fail(str(e))
        if name != "galore":
            tl.fail(f"bench.py subspaces --kept: {spec} is not a GaLoreAdamW spec (galore[:KIND][+SWITCH]...)")
        runs.append(tl.parse_args([*rest, "--quiet", "--optimizer", spec, "--out-dir",
                                   str(Path(base.out_dir) / spec)]))
    if not runs:
        tl.fail("bench.py subspaces --kept: name at least one spec")
    for args in runs:
        tl.check_out_dir(args)
    dist = tl.setup_distributed(runs[0])
    data, val = tl.load_data(runs[0], tl.load_tokenizer(runs[0]), dist)  # (its line names the first spec)
    update, measured, results = la.GaLoreAdamW._update, {}, {}  # spec -> [t, kind of step, e, o] of each step
    steps: list = []  # the list of the run under way (measuring reads the name when it is called)

    def measuring(self, p, state, group, index):
        t = state.get("step", 0) + 1
        if "P" in state:  # the basis held after step t-1, before this step refreshes or moves it
            energy = kept_energy(p.grad, state["P"], la.oriented(p, group["proj_type"])[1])
            if energy is not None:
                kind = "refresh" if la.refresh_due(t, index, group) else (
                    "after" if la.refresh_due(t - 1, index, group) else "between")
                steps.append([t, kind, *energy])
        update(self, p, state, group, index)

    la.GaLoreAdamW._update = measuring
    try:
        with Progress(len(runs), "run", "subspaces --kept", shown=dist.master) as progress:
            for args in runs:
                progress.start(args.optimizer)
                steps = measured[args.optimizer] = []
                results[args.optimizer] = tl.train(args, data, val, dist)
    finally:
        la.GaLoreAdamW._update = update
    (Path(base.out_dir) / "kept.json").write_text(json.dumps(
        {spec: {"val_loss": results[spec]["val_loss"], "steps": measured[spec]} for spec in results}))
    cell = lambda xs: f"{statistics.median(xs):.4f} ({percentile(xs, 5):.4f})" if xs else "–"
    first = runs[0]
    gap = tl.optimizer_options(first)[1].get("update_proj_gap", 200)
    lines = [f"energy each basis keeps of the next gradient, e = ||Bᵀ G_t||² / ||G_t||² (B: the basis held after "
             f"step t-1), and e/o (o: the best rank-r basis's, exact SVD): {first.model}, rank {first.rank}, "
             f"T = {gap}, {first.max_steps} steps on {llama_c4.corpus_name(first)}, lr {first.lr:g}, "
             f"seed {first.seed}; "
             f"median (5th percentile) over every low-rank matrix and step t >= 2; e/o also at the refresh "
             f"steps t ≡ 1 (mod T) alone (B: the basis the refresh replaces), at the steps t ≡ 2 after them "
             f"(B: the new basis) and at the others", "",
             "| spec | val loss | o | e | e/o | e/o at t ≡ 1 | e/o at t ≡ 2 | e/o at the other steps |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, done in measured.items():
        ratios = lambda kind: cell([e / o for _, k, e, o in done if k == kind])
        lines.append(f"| {spec} | {results[spec]['val_loss']:.4f} | {cell([o for *_, o in done])} | "
                     f"{cell([e for _, _, e, _ in done])} | {cell([e / o for *_, e, o in done])} | "
                     f"{ratios('refresh')} | {ratios('after')} | {ratios('between')} |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- sensitivity: noise amplification

def sensitivity_optimizers(ranks: list[int], hidden: int) -> dict:
    """The optimizers `bench.py sensitivity` compares: name -> (model -> optimizer, lr).
    Adapprox's ranks are held with err_tol=0 (each rank starts at k_max and stays there)
    and k_max_frac = rank / hidden; at full rank Adapprox keeps V dense (exact). Each
    factored Adapprox row also runs with the other ``row_col_scaling`` setting and
    with factor_dtype="float32" (V formed, factored and kept in float32); full rank runs
    with V in float64 (the default) and in float32."""
    A = la.Adapprox
    out = {"AdamW": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), 3e-3),
           "torch Adafactor": (lambda m, lr: torch.optim.Adafactor(m.parameters(), lr=lr), 1e-2)}
    adapprox = {"Adapprox (default)": {}}
    for r in ranks:
        adapprox[f"Adapprox rank {r} held"] = dict(err_tol=0.0, k_max_frac=r / hidden)
    scaled = inspect.signature(A).parameters["row_col_scaling"].default  # the other setting is the variant
    for name, options in adapprox.items():
        out[name] = (lambda m, lr, o=options: A(m.parameters(), lr=lr, **o), 3e-3)
        out[f"{name}, {'no' if scaled else 'with'} row/column scaling"] = (
            lambda m, lr, o=options: A(m.parameters(), lr=lr, row_col_scaling=not scaled, **o), 3e-3)
        out[f"{name}, float32 factors"] = (lambda m, lr, o=options: A(m.parameters(), lr=lr,
                                                                       factor_dtype="float32", **o), 3e-3)
    full = dict(err_tol=0.0, k_max_frac=1.0, clip_threshold=None)  # a dense V: scaling plays no part
    out["Adapprox full rank, clipping off"] = (lambda m, lr: A(m.parameters(), lr=lr, **full), 3e-3)
    out["Adapprox full rank, clipping off, float32 factors"] = (
        lambda m, lr: A(m.parameters(), lr=lr, factor_dtype="float32", **full), 3e-3)
    return out

def sensitivity_run(model, make_opt, lr: float, batches: list, perturb: tuple[int, float] | None = None) -> list:
    """Train ``model`` in place on ``batches`` (constant lr, no gradient clipping); ``perturb``
    = (step, size): at that step (1-based) every gradient entry is multiplied by 1 + size·z,
    z ~ N(0, 1) seeded (relative noise: a zero entry, such as an absent token's embedding
    row, stays zero). Returns the final weights."""
    opt = make_opt(model, lr)
    noise = torch.Generator().manual_seed(1234)
    for step, (x, y) in enumerate(batches, 1):
        model(x, y)[1].backward()
        if perturb is not None and step == perturb[0]:
            for p in model.parameters():
                p.grad.mul_(1 + perturb[1] * torch.randn(p.grad.shape, generator=noise, dtype=p.grad.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]

def distance(a: list, b: list) -> float:
    return math.sqrt(sum((x.double() - y.double()).square().sum().item() for x, y in zip(a, b)))

def sensitivity(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py sensitivity", description="How much each optimizer amplifies a tiny gradient "
                  "perturbation: sensitivity = ||W_perturbed - W|| / ||W - W_0|| after --steps steps, where "
                  "W_perturbed had --noise relative noise added to every gradient at step --perturb-step "
                  "(AdamW, torch Adafactor, and Adapprox at its default and at each --ranks rank held, each also with the "
                  "other row_col_scaling setting and with float32 factors). Also the distance of full-rank Adapprox "
                  "without clipping, V in float64 and in float32, from AdamW's trajectory (the same in exact "
                  "arithmetic). "
                  "Constant lr, no gradient clipping, float32 (or --float64), one CPU thread. Other flags: --model, --seq-len, "
                  "--batch-size, --seed, --data or --corpus.", formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each run")
    p.add_argument("--perturb-step", type=int, default=6, help="the step whose gradients get the noise")
    p.add_argument("--noise", type=float, default=1e-7, help="relative noise: each gradient entry times 1 + noise·N(0, 1)")
    p.add_argument("--ranks", default="1,4,16", help="comma list of Adapprox ranks to hold (err_tol=0)")
    p.add_argument("--only", help="comma list of substrings: run only the optimizers whose names contain one")
    p.add_argument("--float64", action="store_true", help="model, gradients and optimizers in float64: what "
                   "remains is the algorithms' own amplification, without float32 rounding")
    own, rest = p.parse_known_args(argv)
    args = tl.parse_args(["--model", "9m", "--batch-size", "8", "--seq-len", "64", *rest])
    if not 1 <= own.perturb_step <= own.steps:
        tl.fail(f"--perturb-step {own.perturb_step}: must be in [1, --steps]")
    torch.set_num_threads(args.threads or 1)
    corpus = llama_c4.data_source(args)
    tokenizer = tl.load_tokenizer(args)
    stream = llama_c4.C4Data(corpus, tokenizer, args.seq_len).train_batches(args.batch_size, args.seed,
                                                                            args.shuffle_buffer)
    batches = [next(stream) for _ in range(own.steps)]
    torch.manual_seed(args.seed)
    model = tl.build_model(args, tokenizer.vocab_size)
    if own.float64:
        model.double()
    w0 = copy.deepcopy(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    hidden = tl.MODEL_SHAPES[args.model][0]
    ranks = [int(r) for r in own.ranks.split(",") if r]
    lines = [f"sensitivity to {own.noise:g} relative gradient noise at step {own.perturb_step} of {own.steps} "
             f"({args.model}, batch {args.batch_size}×{args.seq_len}, seed {args.seed}, "
             f"{'float64' if own.float64 else 'float32'}, constant lr; {llama_c4.corpus_name(args)})", "",
             "| optimizer | lr | sensitivity | ‖W - W_0‖ | seconds |", "|---|---|---|---|---|"]
    finals = {}
    for name, (make, lr) in sensitivity_optimizers(ranks, hidden).items():
        if own.only and not any(s in name for s in own.only.split(",")):
            continue
        t0 = time.perf_counter()
        model.load_state_dict(w0)
        w = finals[name] = sensitivity_run(model, make, lr, batches)
        model.load_state_dict(w0)
        wp = sensitivity_run(model, make, lr, batches, (own.perturb_step, own.noise))
        moved = distance(w, start)
        lines.append(f"| {name} | {lr:g} | {distance(wp, w) / moved:.2e} | {moved:.3f} | "
                     f"{time.perf_counter() - t0:.1f} |")
    for full in ("Adapprox full rank, clipping off", "Adapprox full rank, clipping off, float32 factors"):
        if full in finals and "AdamW" in finals:
            lines += ["", f"{full} vs AdamW (same lr, betas, eps, no weight decay), after {own.steps} steps: "
                      f"||W_adapprox - W_adamw|| / ||W_adamw - W_0|| = "
                      f"{distance(finals[full], finals['AdamW']) / distance(finals['AdamW'], start):.2e}"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------- loader: tokens per second

def train_bpe(corpus: str, vocab_size: int, path: Path) -> Path:
    """A byte-level BPE tokenizer.json trained on the train shards of ``corpus``
    (needs the tokenizers package), with </s> as end-of-document token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,  # no blank
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())         # lines in a log
    tok.train_from_iterator(llama_c4.read_documents(llama_c4.find_shards(corpus)[0], llama_c4.DataStats()), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path

def loader(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py loader", description="Tokens per second the training data loader delivers "
                  "(read, parse, tokenize, pack, shuffle, batch), for the byte tokenizer and a BPE tokenizer. "
                  "Other flags: --data or --corpus, --tokenizer, --seq-len, --batch-size.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--bpe", type=int, default=8000, help="vocabulary of the BPE tokenizer trained on the corpus "
                   "when --tokenizer is not given (0: only the byte tokenizer)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each tokenizer is timed")
    own, rest = p.parse_known_args(argv)
    args = tl.parse_args(["--threads", "1", *rest])
    torch.set_num_threads(1)
    corpus = llama_c4.data_source(args)
    trains = bool(own.bpe) and not args.tokenizer  # a BPE tokenizer trained on the corpus first
    with Progress(1 + bool(args.tokenizer or own.bpe) + trains, "measurement", "loader") as progress:
        tokenizers = {"bytes": llama_c4.ByteTokenizer()}
        if args.tokenizer:
            tokenizers[args.tokenizer] = tl.load_tokenizer(args)
        elif own.bpe:
            progress.start(f"train a BPE tokenizer of {own.bpe} tokens on the corpus")
            path = train_bpe(corpus, own.bpe, Path(args.cache_dir).expanduser() / f"bpe{own.bpe}" / "tokenizer.json")
            try:
                tokenizers[f"BPE {own.bpe} (trained on the corpus)"] = llama_c4.FileTokenizer(str(path), "</s>")
            except llama_c4.DataError as e:
                tl.fail(str(e))
        cores = os.environ.get("RAYON_NUM_THREADS") or f"every core ({os.cpu_count()}; RAYON_NUM_THREADS=1 for one)"
        lines = [f"data loader, one thread; a tokenizers BPE encodes on {cores} ({llama_c4.corpus_name(args)}, "
                 f"seq len {args.seq_len}, "
                 f"batch {args.batch_size})", "",
                 "| tokenizer | tokens/s | bytes of text per token |", "|---|---|---|"]
        for name, tok in tokenizers.items():
            progress.start(f"{name}: {own.seconds:g} s of batches")
            lines.append(loader_row(name, tok, corpus, args, own.seconds))
    return "\n".join(lines)

def loader_row(name: str, tok, corpus: str, args, seconds: float) -> str:
    """loader's table row of one tokenizer: tokens/s over ``seconds``, and bytes of text per token."""
    data = llama_c4.C4Data(corpus, tok, args.seq_len)
    batches, tokens, t0 = data.train_batches(args.batch_size, 0, args.shuffle_buffer), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tokens += next(batches)[0].numel()
    rate = tokens / (time.perf_counter() - t0)
    docs = list(llama_c4.read_documents(data.train_files[:1], llama_c4.DataStats()))
    per_token = sum(len(d.encode()) for d in docs) / sum(len(tok.encode(d)) for d in docs)
    return f"| {name} | {rate:,.0f} | {per_token:.2f} |"

# ----------------------------------------------------------------------------- memory: optimizer state per method

PUBLISHED_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}

def predicted_state_bytes(model: torch.nn.Module, method: str, rank: int, *, beta1: float = 0.9,
                          error_bytes: int = 4, k_max_frac: float = 0.25, factor_bytes: int = 8) -> int:
    """Optimizer state in bytes from the per-matrix formulas, float32 state
    (Adapprox's factors: ``factor_bytes``, 8 for its default float64).

    Equal to ``state_bytes`` after a real step (tested on small configs).
    AdaptiveAdamW is counted at uniform ranks (its total moves with the
    allocation, since matrices differ in their long side); Adapprox at its
    largest rank k_max (the rank rule can only lower it).
    """
    f = 4
    lowrank = {id(p) for g in la.lowrank_groups(model, rank) if g["rank"] is not None for p in g["params"]}
    total = 0
    for p in model.parameters():
        if method == "adamw":
            total += 2 * f * p.numel() + 4  # m, v and torch's float32 step tensor
        elif method == "adapprox" and la.Adapprox.is_factored(p):
            m, n = p.shape
            k = max(1, int(k_max_frac * min(m, n)))
            factors = m * n if k == min(m, n) else k * (m + n) + m + n  # a dense V at full rank; Q, U, scales
            total += factor_bytes * (factors + 1) + f * (m * n if beta1 > 0 else 0)  # ... and the exponent; M
        elif method == "adapprox":
            total += f * p.numel() * (2 if beta1 > 0 else 1)
        elif id(p) not in lowrank:
            total += 2 * f * p.numel()  # the dense AdamW path
        else:
            s, l = min(p.shape), max(p.shape)
            r = min(rank, s)
            total += f * (2 * r * l + s * r)  # m, v: r×l ; P: s×r
            total += 4 if method == "adaptive" else 0  # the limiter's previous RMS
            total += error_bytes * p.numel() if method == "ldadam" else 0  # error-feedback buffer
    return total

def memory_table(configs=("60m", "130m", "350m", "1b"), ranks=(None, 4, 8)) -> str:
    """Markdown: optimizer state per method (GB and % of AdamW) at several ranks."""
    rows = ["| model | rank | AdamW GB | GaLore / AdaptiveAdamW | LDAdam (fp32 EF) | LDAdam (bf16 EF) | "
            "Adapprox β1=0.9 | Adapprox β1=0 |", "|---|---|---|---|---|---|---|---|"]
    with Progress(len(configs), "measurement", "memory") as progress:
        for name in configs:
            progress.start(f"the {name} shape")
            rows += memory_rows(name, ranks)
    return "\n".join(rows)

def memory_rows(name: str, ranks) -> list[str]:
    """memory_table's rows of one model shape."""
    rows = []
    model = tl.build_model(argparse.Namespace(model=name, seq_len=64), 32000, device="meta")
    adamw = predicted_state_bytes(model, "adamw", 1)
    cell = lambda b: f"{b / 1e9:.3f} ({100 * b / adamw:.1f} %)"
    for rank in ranks:
        r = PUBLISHED_RANKS.get(name, 128) if rank is None else rank
        rows.append(f"| {name} | {r} | {adamw / 1e9:.3f} | {cell(predicted_state_bytes(model, 'galore', r))} | "
                    f"{cell(predicted_state_bytes(model, 'ldadam', r))} | "
                    f"{cell(predicted_state_bytes(model, 'ldadam', r, error_bytes=2))} | "
                    f"{cell(predicted_state_bytes(model, 'adapprox', r))} | "
                    f"{cell(predicted_state_bytes(model, 'adapprox', r, beta1=0.0))} |")
    return rows

def memory(argv: list[str]) -> str:
    tl.Parser(prog="bench.py memory", description="Optimizer state of every method for the 60m-1b shapes at their "
              "published ranks and at ranks 4 and 8 (float32 state; Adapprox at k_max, its largest, with its "
              "factors in float64 as by default; 32k vocabulary).").parse_args(argv)
    table = memory_table()
    print(table)
    return table

# ----------------------------------------------------------------------------- plot: loss curves and ranks

def import_pyplot(hint: str = ""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        tl.fail(f"plots need matplotlib, which is not installed: pip install matplotlib{hint}")
    return plt

def read_runs(out_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl of a run folder, or of every run folder inside one: {run name: rows}."""
    single = out_dir / "metrics.jsonl"
    files = [single] if single.exists() else sorted(out_dir.glob("*/metrics.jsonl"))
    return {f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files}

def make_plots(out_dir: Path) -> list[Path]:
    """Loss curves of every run, and the ranks of each AdaptiveAdamW or Adapprox run, as PNGs in out_dir."""
    plt = import_pyplot()
    runs = read_runs(out_dir)
    if not runs:
        tl.fail(f"no runs (metrics.jsonl) in {out_dir} or its folders")
    written = [plot_losses(plt, runs, out_dir / "loss_curves.png")]
    for name, rows in runs.items():
        optimizer = next((r["optimizer"] for r in rows if "optimizer" in r), name)
        names = next((r["rank_names"] for r in rows if r.get("rank_names")), None)
        history = [(r["step"], r["ranks"]) for r in rows if "ranks" in r]
        if names and history and optimizer.startswith(("adaptive", "adapprox")):
            written.append(plot_ranks(plt, name, optimizer, names, history, out_dir / f"ranks_{name}.png"))
    return written

def plot_losses(plt, runs: dict, path: Path) -> Path:
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for name, rows in runs.items():
        label = name.rsplit("-seed", 1)[0]
        first = label not in colors
        color = colors.setdefault(label, f"C{len(colors) % 10}")
        t = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        v = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if t:
            ax_t.plot(*zip(*t), color=color, alpha=0.6, lw=1, label=label if first else None)
        if v:
            ax_v.plot(*zip(*v), color=color, marker="o", lw=1.5, label=label if first else None)
    for ax, title in ((ax_t, "train loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def plot_ranks(plt, name: str, optimizer: str, names: list, history: list, path: Path) -> Path:
    """AdaptiveAdamW: a matrices x allocations heatmap; Adapprox: each matrix's rank over time and the mean."""
    short = [n.replace("layers.", "L").replace(".weight", "").replace("_proj", "") for n in names]
    if optimizer.startswith("adaptive"):
        # one column per allocation: keep the rank vectors where they change
        cols = [history[0]] + [h for prev, h in zip(history, history[1:]) if h[1] != prev[1]]
        grid = [[c[1][i] for c in cols] for i in range(len(names))]  # (matrices, allocations)
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(cols) + 3), 0.25 * len(names) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(short)), short, fontsize=7)
        ax.set_xticks(range(len(cols)), [str(c[0]) for c in cols], fontsize=7)
        ax.set_xlabel("logged at step (each column: a new allocation)")
        for i, row in enumerate(grid):
            for j, rank in enumerate(row):
                ax.text(j, i, str(rank), ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, label="rank")
        ax.set_title(f"AdaptiveAdamW ranks: {name}")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [h[0] for h in history]
        for i in range(len(short)):
            ax.plot(steps, [h[1][i] for h in history], lw=0.8, alpha=0.5)
        ax.plot(steps, [sum(h[1]) / len(h[1]) for h in history], color="k", lw=2, label="mean")
        ax.set_xlabel("step")
        ax.set_ylabel("rank k of V ≈ Q Uᵀ")
        ax.legend()
        ax.set_title(f"Adapprox ranks: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

RESULT_KEYS = {"label", "val_loss", "spread", "state_pct", "lr", "from"}

def read_results(path: Path) -> tuple[str | None, list[dict]]:
    """(title, rows) of a results file for `bench.py plot --results`: each row a dict with label,
    val_loss, spread (0 when unknown) and state_pct. Two formats (see `plot`'s help): compare's
    results.json, or a table {"title": ..., "rows": [...]}. Anything else fails with one line."""
    def bad(why):
        tl.fail(f"{path}: {why} (expected compare's results.json, or {{\"rows\": [{{\"label\": ..., "
                f"\"val_loss\": ..., \"state_pct\": ..., \"spread\": ...}}]}}; see bench.py plot --help)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        tl.fail(f"{path}: no such file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        bad(f"not JSON ({e})")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(data, list):  # bench.py compare's results.json: one dict per run
        if not data or not all(isinstance(r, dict) and isinstance(r.get("optimizer"), str) and
                                number(r.get("val_loss")) and number(r.get("state_mb")) and number(r.get("lr"))
                                for r in data):
            bad("a list whose items are not all runs of bench.py compare (optimizer, lr, val_loss, state_mb)")
        by_run: dict[tuple, list[dict]] = {}
        for r in data:
            by_run.setdefault((r["optimizer"], r["lr"]), []).append(r)
        med = lambda rs, key: statistics.median(r[key] for r in rs)
        best: dict[str, list[dict]] = {}  # each optimizer at its best lr, as compare's table
        for (name, lr), rs in by_run.items():
            if name not in best or med(rs, "val_loss") < med(best[name], "val_loss"):
                best[name] = rs
        if "adamw" not in best:
            bad("no adamw run, so no state as % of AdamW's")
        ref = med(best["adamw"], "state_mb")
        rows = [dict(label=name, lr=rs[0]["lr"], val_loss=med(rs, "val_loss"), state_pct=100 * med(rs, "state_mb") / ref,
                     spread=(max(r["val_loss"] for r in rs) - min(r["val_loss"] for r in rs)) / 2)
                for name, rs in best.items()]
        return None, rows
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        bad("neither a list of runs nor an object with a non-empty \"rows\" list")
    if set(data) - {"title", "rows"}:
        bad(f"unknown key(s) {', '.join(sorted(set(data) - {'title', 'rows'}))}")
    rows = []
    for i, row in enumerate(data["rows"], 1):
        if not isinstance(row, dict):
            bad(f"row {i} is not an object")
        name = row.get("label", f"row {i}")
        if set(row) - RESULT_KEYS:
            bad(f"{name}: unknown key(s) {', '.join(sorted(set(row) - RESULT_KEYS))}")
        if not isinstance(row.get("label"), str) or not row["label"]:
            bad(f"row {i}: \"label\" must be a non-empty string")
        for key in ("val_loss", "state_pct"):
            if not number(row.get(key)):
                bad(f"{name}: \"{key}\" must be a number, not {row.get(key)!r}")
        if not number(row.get("spread", 0)) or row.get("spread", 0) < 0:
            bad(f"{name}: \"spread\" must be a number >= 0, not {row['spread']!r}")
        if row["state_pct"] <= 0:
            bad(f"{name}: \"state_pct\" must be > 0, not {row['state_pct']!r}")
        rows.append(dict(row, spread=row.get("spread", 0)))
    return data.get("title"), rows

def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both loss and state (at most as high in both, lower in one),
    in order of state."""
    def beats(a, b):
        return (a["val_loss"] <= b["val_loss"] and a["state_pct"] <= b["state_pct"] and
                (a["val_loss"] < b["val_loss"] or a["state_pct"] < b["state_pct"]))
    return sorted((r for r in rows if not any(beats(o, r) for o in rows)), key=lambda r: r["state_pct"])

def plot_loss_vs_state(plt, title: str | None, rows: list[dict], path: Path) -> Path:
    """One labelled point per optimizer (error bar: the seeds' spread), the Pareto front dashed."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    front = pareto_front(rows)
    ax.plot([r["state_pct"] for r in front], [r["val_loss"] for r in front], "k--", lw=1, alpha=0.6,
            label="Pareto front: no other point is lower in both loss and state", zorder=1)
    for i, r in enumerate(rows):
        ax.errorbar(r["state_pct"], r["val_loss"], yerr=r["spread"] or None, fmt="o", ms=6, capsize=3,
                    color=f"C{i % 10}", zorder=2)
    states, losses = [r["state_pct"] for r in rows], [r["val_loss"] for r in rows]
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200) if min(states) / 2 <= t <= max(states) * 2]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(min(states) / 1.5, max(states) * 1.6)
    low = min(r["val_loss"] - r["spread"] for r in rows)
    high = max(r["val_loss"] + r["spread"] for r in rows)
    ax.set_ylim(low - 0.06 * (high - low), high + 0.06 * (high - low))
    ax.set_xlabel("optimizer state, % of AdamW's (log scale)")
    ax.set_ylabel("final validation loss (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    # each label right of its point, else left, above or below: the first place that covers no
    # other point and no label placed before it
    renderer = fig.canvas.get_renderer()
    points = [ax.transData.transform((x, y)) for x, y in zip(states, losses)]
    taken = []
    for r, (px, py) in zip(rows, points):
        for dx, dy, ha, va in ((7, 0, "left", "center"), (-7, 0, "right", "center"),
                               (0, 8, "center", "bottom"), (0, -8, "center", "top")):
            label = ax.annotate(r["label"], (r["state_pct"], r["val_loss"]), xytext=(dx, dy), ha=ha, va=va,
                                textcoords="offset points", fontsize=8, weight="bold" if r in front else "normal")
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            clear = (not any(box.overlaps(b) for b in taken) and
                     not any(box.x0 - 5 <= qx <= box.x1 + 5 and box.y0 - 5 <= qy <= box.y1 + 5 for qx, qy in points))
            if clear or ha == "center" and va == "top":
                break
            label.remove()
        taken.append(box)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

# matplotlib's default colours C0-C9, so that the SVG colours the rows as the PNG does
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

def svg_loss_vs_state(title: str | None, rows: list[dict], path: Path) -> Path:
    """plot_loss_vs_state's picture as hand-written SVG, with Python alone (no matplotlib). In row
    order, one circle of class "point" per row, its error bar (the seeds' spread) and its label (bold on
    the front); the Pareto front a dashed polyline of class "front" through its points in order of
    state; for each row whose label starts with "Muon", a dotted line of class "muon" across the plot
    at its loss over its ± spread band, to read every other point against Muon; the legend under
    the plot. Text widths are estimated (0.6 of the font size a character), so each label goes, as
    in the PNG, right of its point, else left, above or below: the first place inside the plot clear
    of the points and of the labels before it. Coordinates are rounded to 0.1 px: the same rows, the
    same bytes."""
    muons = [(i, r) for i, r in enumerate(rows) if r["label"].startswith("Muon")]
    entries = [("6 4", "black", "Pareto front: no other point is lower in both loss and state")]
    entries += [("2 3", TAB10[i % 10], f"{r['label']}'s loss ± its spread") for i, r in muons]
    width, height, font = 800, 480 + 16 * len(entries), 11
    titles = title.splitlines() if title else []
    left, right, top, bottom = 64.0, 785.0, 14.0 + 16 * len(titles), 430.0  # the plot area, px
    states, front = [r["state_pct"] for r in rows], pareto_front(rows)
    s0, s1 = min(states) / 1.5, max(states) * 1.6  # as the PNG's limits
    low = min(r["val_loss"] - r["spread"] for r in rows)
    high = max(r["val_loss"] + r["spread"] for r in rows)
    pad = 0.06 * (high - low) or 0.05  # a single loss still gets a range
    v0, v1 = low - pad, high + pad
    x = lambda s: left + (right - left) * math.log(s / s0) / math.log(s1 / s0)  # log scale
    y = lambda v: bottom - (bottom - top) * (v - v0) / (v1 - v0)
    f = lambda number: f"{number:.1f}"
    esc = lambda text: escape(text, {'"': "&quot;"})
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="{font}">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    out += [f'<text x="{f(width / 2)}" y="{18 + 16 * i}" text-anchor="middle" font-size="12">{esc(line)}</text>'
            for i, line in enumerate(titles)]
    # grid and ticks: x at 1, 2 and 5 times each power of ten inside the limits, y every 1, 2 or 5
    # times a power of ten, the one that gives at most 6 steps
    xticks = [m * 10.0 ** e for e in range(math.floor(math.log10(s0)), math.ceil(math.log10(s1)) + 1)
              for m in (1, 2, 5) if s0 <= m * 10.0 ** e <= s1]
    exponent = math.floor(math.log10((v1 - v0) / 6))
    step = next(m * 10.0 ** exponent for m in (1, 2, 5, 10) if m * 10.0 ** exponent >= (v1 - v0) / 6)
    yticks = [k * step for k in range(math.ceil(v0 / step), math.floor(v1 / step) + 1)]
    for t in xticks:
        out.append(f'<line x1="{f(x(t))}" y1="{f(top)}" x2="{f(x(t))}" y2="{f(bottom)}" stroke="#ddd"/>')
        out.append(f'<text x="{f(x(t))}" y="{f(bottom + 15)}" text-anchor="middle">{t:g}</text>')
    for t in yticks:
        out.append(f'<line x1="{f(left)}" y1="{f(y(t))}" x2="{f(right)}" y2="{f(y(t))}" stroke="#ddd"/>')
        out.append(f'<text x="{f(left - 5)}" y="{f(y(t) + 4)}" text-anchor="end">'
                   f'{t:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}</text>')
    out.append(f'<text x="{f((left + right) / 2)}" y="{f(bottom + 38)}" text-anchor="middle">'
               f'optimizer state, % of AdamW\'s (log scale)</text>')
    out.append(f'<text transform="rotate(-90 16 {f((top + bottom) / 2)})" x="16" y="{f((top + bottom) / 2)}" '
               f'text-anchor="middle">final validation loss per token (a byte by default), lower is better</text>')
    # Muon's band and line under the points
    for i, r in muons:
        color, (hi, lo) = TAB10[i % 10], (y(r["val_loss"] + r["spread"]), y(r["val_loss"] - r["spread"]))
        out.append(f'<rect x="{f(left)}" y="{f(hi)}" width="{f(right - left)}" height="{f(lo - hi)}" '
                   f'fill="{color}" fill-opacity="0.12"/>')
        out.append(f'<line class="muon" x1="{f(left)}" y1="{f(y(r["val_loss"]))}" x2="{f(right)}" '
                   f'y2="{f(y(r["val_loss"]))}" stroke="{color}" stroke-width="1.5" stroke-dasharray="2 3"/>')
    points = [(x(r["state_pct"]), y(r["val_loss"])) for r in rows]
    corners = " ".join(f"{f(x(r['state_pct']))},{f(y(r['val_loss']))}" for r in front)
    out.append('<polyline class="front" fill="none" stroke="black" stroke-opacity="0.6" stroke-dasharray="6 4" '
               f'points="{corners}"/>')
    for i, (r, (px, py)) in enumerate(zip(rows, points)):
        color = TAB10[i % 10]
        if r["spread"]:
            hi, lo = y(r["val_loss"] + r["spread"]), y(r["val_loss"] - r["spread"])
            out.append(f'<path d="M{f(px)},{f(hi)}V{f(lo)}M{f(px - 4)},{f(hi)}H{f(px + 4)}'
                       f'M{f(px - 4)},{f(lo)}H{f(px + 4)}" stroke="{color}"/>')
        out.append(f'<circle class="point" cx="{f(px)}" cy="{f(py)}" r="4" fill="{color}"/>')
    # the legend, under the axis label (inside the plot it could hide Muon's line)
    for k, (dashes, color, text) in enumerate(entries):
        ey = height - 10 - 16 * (len(entries) - 1 - k)
        out.append(f'<line x1="{f(left)}" y1="{f(ey - 4)}" x2="{f(left + 24)}" y2="{f(ey - 4)}" stroke="{color}" '
                   f'stroke-width="1.5" stroke-dasharray="{dashes}"/>')
        out.append(f'<text x="{f(left + 30)}" y="{f(ey)}">{esc(text)}</text>')
    taken = []  # the label boxes placed so far
    for r, (px, py) in zip(rows, points):
        bold = r in front
        w = 0.6 * font * len(r["label"]) * (1.1 if bold else 1)
        for tx, ty, anchor, x0 in ((px + 7, py + 4, "start", px + 7), (px - 7, py + 4, "end", px - 7 - w),
                                   (px, py - 9, "middle", px - w / 2), (px, py + 9 + font, "middle", px - w / 2)):
            label = (x0, ty - font, x0 + w, ty + 3)  # its box: left, top, right, bottom
            clear = (left <= label[0] and label[2] <= right and top <= label[1] and label[3] <= bottom and
                     not any(label[0] < b[2] and b[0] < label[2] and label[1] < b[3] and b[1] < label[3]
                             for b in taken) and
                     not any(label[0] - 5 <= qx <= label[2] + 5 and label[1] - 5 <= qy <= label[3] + 5
                             for qx, qy in points))
            if clear:
                break  # else the last, below, as the PNG
        taken.append(label)
        weight = ' font-weight="bold"' if bold else ""
        out.append(f'<text x="{f(tx)}" y="{f(ty)}" text-anchor="{anchor}"{weight}>{esc(r["label"])}</text>')
    out.append(f'<rect x="{f(left)}" y="{f(top)}" width="{f(right - left)}" height="{f(bottom - top)}" '
               'fill="none" stroke="black"/>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(out) + "\n").encode("utf-8"))
    return path

PLOT_HELP = """\
Without --results: loss curves of the runs in --out-dir (loss_curves.png), and the ranks
of each AdaptiveAdamW or Adapprox run (ranks_RUN.png), written into --out-dir.

With --results FILE: one picture, --out, of final validation loss against optimizer
state (% of AdamW's): one labelled point per optimizer, its error bar the seeds' spread,
and a dashed line through the Pareto front (the points that no other point beats on
both loss and state); with an --out ending in .svg, also a dotted line across at the loss
of each row labelled Muon..., to read every other point against it. An --out ending in
.png needs matplotlib; one ending in .svg is written by Python alone (no matplotlib).
FILE is JSON, either
  - the results.json that `bench.py compare` writes into its --out-dir: each optimizer
    at its best lr, the median over seeds ± half the range, state as % of the adamw
    run's (it needs one), as compare's table shows them; or
  - a table of results measured before: {"title": "...", "rows": [{"label": "AdamW",
    "val_loss": 2.1014, "spread": 0.0545, "state_pct": 100, "lr": 6e-3,
    "from": "a RESULTS.md section"}, ...]}, with label, val_loss and state_pct required,
    spread (half the range over seeds; 0 or left out: no error bar), lr and from
    optional, and no other keys (docs/tiny_results.json is one).
A file in neither form is refused with one line saying what is wrong.

examples:
  python bench.py plot --out-dir out/compare
  python bench.py plot --results out/compare/results.json --out out/compare/loss_vs_state.png
  python bench.py plot --results docs/tiny_results.json --out docs/loss_vs_state.svg
"""

def plot(argv: list[str]) -> list[Path]:
    p = tl.Parser(prog="bench.py plot", description="PNG plots (needs matplotlib); --results with an --out "
                  "ending in .svg draws SVG with Python alone (no matplotlib).", epilog=PLOT_HELP,
                  allow_abbrev=False, formatter_class=tl.HelpFormatter)
    p.add_argument("--out-dir", default="out/compare", help="a run folder, or a folder of run folders (without "
                   "--results)")
    p.add_argument("--results", help="a results file (JSON, see below): draw loss against optimizer state instead")
    p.add_argument("--out", help="the picture --results draws: .png (needs matplotlib) or .svg (needs nothing "
                   "but Python) (default: loss_vs_state.png beside the results file)")
    args = p.parse_args(argv)
    if args.results is None:
        if args.out is not None:
            tl.fail("--out names the picture of --results: without --results, plots go into --out-dir")
        written = make_plots(Path(args.out_dir))
    else:
        results = Path(args.results)
        title, rows = read_results(results)  # a malformed file is refused before matplotlib is needed
        out = Path(args.out) if args.out else results.with_name("loss_vs_state.png")
        if out.suffix.lower() == ".svg":
            written = [svg_loss_vs_state(title, rows, out)]  # Python alone, no matplotlib
        elif out.suffix.lower() == ".png":
            plt = import_pyplot(" (or --out FILE.svg, which needs none)")
            written = [plot_loss_vs_state(plt, title, rows, out)]
        else:
            tl.fail(f"--out {out}: must end in .png or .svg")
    for path in written:
        print(f"wrote {path}")
    return written

# ----------------------------------------------------------------------------- shard: state and peak per rank

SHARD_MODES = {"ddp": [], "zero": ["--zero"], "fsdp": ["--fsdp"]}
SHARD_NAMES = {"ddp": "DDP", "zero": "--zero (ZeRO-1)", "fsdp": "--fsdp (FSDP2)"}

class ShardPeak:
    """This process's peak memory from start() to peak(), measured as `bench.py peak` does: on CUDA
    torch.cuda.max_memory_allocated (reset by start()); on the CPU the peak resident memory (VmHWM,
    reset to VmRSS by start()) minus the resident memory when this object was made (the baseline)."""
    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0 if device.type == "cuda" else resident_kb("VmRSS") * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS

    def peak(self) -> int:
        tl.synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resident_kb("VmHWM") * 1024 - self.baseline

def shard_one(argv: list[str]) -> None:
    """One run under torchrun, in fresh processes: train_tiny_llama.py's flags (--optimizer, --zero or
    --fsdp, ...). Each rank sets up as the script does (NCCL on CUDA, else gloo), then takes its
    baseline (ShardPeak), builds the model (vocab 32,000) wrapped as the script wraps it, and takes
    --max-steps steps on random tokens of its own; the peak counts from the first step on. Rank 0
    prints a JSON line with, per rank in rank order, its optimizer state (la.state_bytes), the bytes of
    its parameters (under FSDP2 its shard) and its peak; or, for a combination the script refuses,
    ``refused``: its one-line refusal."""
    if "RANK" not in os.environ:
        tl.fail("bench.py shard-one runs under torchrun: bench.py shard starts it")
    try:
        args = tl.parse_args(argv)
    except SystemExit as e:
        if os.environ["RANK"] == "0":
            print(json.dumps(dict(refused=str(e.code))), flush=True)
        return
    dist = tl.setup_distributed(args)  # init_process_group (NCCL on CUDA, else gloo), the device, threads
    device = torch.device(dist.device)
    meter = ShardPeak(device)  # before the model exists
    torch.manual_seed(args.seed)
    model = tl.build_model(args, 32000, device)
    if args.fsdp:
        tl.shard_model(model)
    opt = tl.build_optimizer(args, model, zero=args.zero)
    trained = model if args.fsdp else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(args.seed + dist.rank)  # each rank its own batch
    meter.start()
    for _ in range(args.max_steps):  # step 1 allocates the state
        tokens = torch.randint(0, 32000, (args.batch_size, args.seq_len + 1), generator=g).to(device)
        trained(tokens[:, :-1], tokens[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = meter.peak()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2: this rank's rows
    mine = dict(rank=dist.rank, state=la.state_bytes(getattr(opt, "optim", opt)), peak=peak,
                params=sum(p.numel() * p.element_size() for p in local))
    every = [None] * dist.world
    torch.distributed.all_gather_object(every, mine)
    if dist.master:
        print(json.dumps(dict(ranks=every, params=sum(p.numel() for p in model.parameters()), device=dist.device,
                              backend=torch.distributed.get_backend())), flush=True)
    # Neither rank tears gloo down while the other still runs a collective (else SIGABRT), and DDP's
    # reducer goes first: left to the exit, it can be the last holder of gloo's process group, whose
    # teardown then deadlocks with a gloo thread that waits for the GIL.
    torch.distributed.barrier()
    del trained, model, opt
    torch.distributed.destroy_process_group()
    # The line is out; skip the interpreter's teardown, where torch's after an FSDP2 run on gloo now and
    # then aborts ("terminate called without an active exception", SIGABRT: a failed run for torchrun).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def shard_parser() -> tl.Parser:
    p = tl.Parser(prog="bench.py shard", description="Optimizer state and peak memory per rank under torchrun: "
                  "plain DDP, --zero and --fsdp, for each optimizer, over --max-steps steps on random tokens "
                  "(vocab 32,000), each combination in fresh processes (peak: CUDA max_memory_allocated; CPU: peak "
                  "resident memory minus that before the model existed); any other flag (see train_tiny_llama.py "
                  "--help: --model, --rank, --batch-size, --seq-len, --device) applies too.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", default="adamw,galore,adaptive,ldadam,adapprox,muon,adafactor",
                   help="comma list of specs")
    p.add_argument("--modes", default="ddp,zero,fsdp", help="comma list of ddp, zero, fsdp")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (NCCL on GPUs, else gloo on the CPU)")
    return p

def shard_refusal(flags: list[str]) -> str | None:
    """The script's one-line refusal of these flags under torchrun (RANK set, as there), or None:
    a combination it refuses starts no processes."""
    from unittest import mock
    with mock.patch.dict(os.environ, {"RANK": "0"}):
        try:
            tl.parse_args(flags)
        except SystemExit as e:
            return str(e.code)
    return None

def shard_runs(argv: list[str]) -> tuple[list[dict], dict]:
    """bench.py shard's runs: one torchrun per optimizer and mode. A row per combination, in order:
    shard_one's JSON (``ranks``: each rank's state, params and peak bytes) or ``refused``; and what
    the table's heading says (the flags, the processes, the wall time)."""
    own, rest = shard_parser().parse_known_args(argv)
    modes = own.modes.split(",")
    unknown = [m for m in modes if m not in SHARD_MODES]
    if unknown or own.nproc < 2:
        tl.fail(f"--modes {own.modes} --nproc {own.nproc}: modes are {', '.join(SHARD_MODES)}; at least 2 processes")
    rest = ["--grad-clip", "0", "--max-steps", "2", "--warmup-steps", "0", *rest]
    for spec in own.optimizer.split(","):  # the flags, checked here first: one line, not a traceback per rank
        tl.parse_args([*rest, "--optimizer", spec])
    plan = [(spec, mode) for spec in own.optimizer.split(",") for mode in modes]
    rows, t0 = [], time.perf_counter()
    with Progress(len(plan), "run", "shard") as progress:
        for spec, mode in plan:
            progress.start(f"{spec} {SHARD_NAMES[mode]}, {own.nproc} processes")
            flags = [*rest, "--optimizer", spec, *SHARD_MODES[mode]]
            why = shard_refusal(flags)
            if why is not None:
                rows.append(dict(optimizer=spec, mode=mode, refused=why))
                continue
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  str(own.nproc), __file__, "shard-one", *flags], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                tl.fail(f"bench.py shard-one {' '.join(flags)} failed:\n{out.stderr[-8000:]}")
            rows.append(dict(json.loads(lines[-1]), optimizer=spec, mode=mode))
    return rows, dict(args=shared_args(rest), nproc=own.nproc, seconds=time.perf_counter() - t0)

def shard_table(rows: list[dict], info: dict) -> str:
    """shard_runs' rows as markdown: per optimizer and mode, each rank's state and peak, MiB."""
    args, nproc = info["args"], info["nproc"]
    done = [r for r in rows if "ranks" in r]
    params = done[0]["params"] if done else 0
    where = (f"torchrun, {done[0]['backend']}, {done[0]['device'].split(':')[0].upper()}" if done else "torchrun")
    per_rank = " / ".join(f"rank {i}" for i in range(nproc))
    lines = [f"optimizer state and peak memory per rank, MiB ({per_rank}), over {args.max_steps} steps: "
             f"{args.model} ({params / 1e6:.1f}M params, vocab 32,000), rank {args.rank}, batch {args.batch_size} "
             f"x {args.seq_len}, {nproc} processes ({where}), each run in fresh processes, torch "
             f"{torch.__version__}; {info['seconds']:.0f} s", "",
             "| optimizer | mode | state | peak |", "|---|---|---|---|"]
    refusals = []
    for r in rows:
        if "refused" in r:
            refusals.append(f"{r['optimizer']} {SHARD_NAMES[r['mode']]}: {r['refused']}")
            cells = [f"refused ({len(refusals)})", ""]
        else:
            cells = [" / ".join(f"{x['state'] / 2**20:.2f}" for x in r["ranks"]),
                     " / ".join(f"{x['peak'] / 2**20:,.0f}" for x in r["ranks"])]
        lines.append(f"| {r['optimizer']} | {SHARD_NAMES[r['mode']]} | " + " | ".join(cells) + " |")
    lines += [""] + [f"({i}) {why}" for i, why in enumerate(refusals, 1)]
    return "\n".join(lines).rstrip("\n")

def shard(argv: list[str]) -> str:
    return shard_table(*shard_runs(argv))

# ----------------------------------------------------------------------------- main

# ----------------------------------------------------------------------------- trace: the reader's path

def code_lines(code) -> set[int]:
    """The line numbers of ``code``'s function that hold code: not blank, not
    only a comment, not its docstring."""
    import ast
    import io
    import textwrap
    import tokenize
    if code.co_name.startswith("<"):  # a comprehension or lambda: the lines its bytecode covers (getsourcelines
        return {line for _, _, line in code.co_lines() if line is not None}  # would read on past its end)
    lines, start = inspect.getsourcelines(code)
    source = textwrap.dedent("".join(lines))
    skip = set()
    node = ast.parse(source).body[0] if not code.co_name.startswith("<") else None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and isinstance(node.body[0], ast.Expr) \
            and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str):
        skip = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    held = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            held.update(range(tok.start[0], tok.end[0] + 1))
    return {start + i - 1 for i in held - skip}

def reader_path(cls) -> tuple[list[str], int]:
    """The functions of lowrank_adam.py (by name) that run inside two step() calls of ``cls`` on one
    24x40 matrix in a rank group with default options, and their code lines (each line once)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40))
    opt = cls([{"params": [w], "rank": 8}])
    ran = {}
    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == la.__file__:
            ran[frame.f_code] = None
    for _ in range(2):  # the first step (state, first basis) and an ordinary one
        w.grad = torch.randn(24, 40)
        sys.settrace(tracer)
        try:
            opt.step()
        finally:
            sys.settrace(None)
    lines = set().union(*(code_lines(c) for c in ran))
    return sorted({c.co_qualname for c in ran if not c.co_name.startswith("<")}), len(lines)

def add_classes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", default="GaLoreAdamW,AdaptiveAdamW,LDAdam,Adapprox",
                   help="comma list of class names of lowrank_adam")

def named_classes(names: str) -> list[type]:
    """The optimizer classes of lowrank_adam a comma list names (refused: any other name)."""
    classes = [getattr(la, name, None) for name in names.split(",")]
    for name, cls in zip(names.split(","), classes):
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            tl.fail(f"--optimizer {name}: not an optimizer class of lowrank_adam")
    return classes

def trace(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py trace", description="The reader's path through each optimizer: the distinct "
                  "functions of lowrank_adam.py that run inside opt.step() (sys.settrace; one 24x40 matrix in a rank "
                  "group, default options, the first step and an ordinary one) and their code lines, each line once "
                  "(no blank, comment or docstring lines; comprehensions and lambdas count as their function's lines).",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    add_classes_flag(p)
    p.add_argument("--list", action="store_true", help="also list the functions of each")
    own = p.parse_args(argv)
    rows = ["| optimizer | functions | code lines |", "|---|---|---|"]
    listing = []
    for cls in named_classes(own.optimizer):
        functions, lines = reader_path(cls)
        rows.append(f"| {cls.__name__} | {len(functions)} | {lines} |")
        listing.append(f"{cls.__name__}: {', '.join(functions)}")
    return "\n".join(rows + ([""] + listing if own.list else []))

# ----------------------------------------------------------------------------- copyout: one class alone

SECTION_BANNER = re.compile(r"^# =+\n# (\d)\. [^\n]*\n# =+\n", re.M)

def copy_out(name: str, by: str = "sections") -> str:
    """The source a user gets by copying class ``name`` out of lowrank_adam.py with what
    it needs. ``by="sections"`` (as the README says): everything before section 3 (the
    imports and the core), the class's section and each section whose definitions it
    uses. ``by="definitions"``: the module docstring and imports, then only the top-level
    definitions the class reaches, transitively, in file order (the smallest working copy)."""
    import ast
    source = Path(la.__file__).read_text()
    if by == "sections":
        marks = list(SECTION_BANNER.finditer(source))
        bounds = [(int(m.group(1)), m.start(), marks[i + 1].start() if i + 1 < len(marks) else len(source))
                  for i, m in enumerate(marks)]
        text = {k: source[a:b] for k, a, b in bounds if k >= 3}
        own = next(k for k, t in text.items() if f"\nclass {name}(" in t)
        reads = {n.id for n in ast.walk(ast.parse(text[own])) if isinstance(n, ast.Name)}
        defined = {k: {n.name for n in ast.parse(t).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
                   | {x.id for n in ast.parse(t).body if isinstance(n, ast.Assign) for x in n.targets
                      if isinstance(x, ast.Name)} for k, t in text.items()}
        keep = [k for k in sorted(text) if k == own or defined[k] & reads]
        return source[:bounds[[k for k, _, _ in bounds].index(3)][1]] + "".join(text[k] for k in keep)
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    spans: dict[str, tuple] = {}  # name -> (its node, first line, last line)
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for n in names:
            spans[n] = (node, first, node.end_lineno)
    needed, todo = set(), [name]
    while todo:  # every name a needed definition reads (attributes of module-level names included)
        n = todo.pop()
        if n in spans and n not in needed:
            needed.add(n)
            todo += [x.id for x in ast.walk(spans[n][0]) if isinstance(x, ast.Name)]
    head = max(n.end_lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))
               and n.lineno < min(s for _, s, _ in spans.values()))
    kept = sorted({(a, b) for n, (_, a, b) in spans.items() if n in needed})
    return "".join(lines[:head]) + "".join("\n\n" + "".join(lines[a - 1:b]) for a, b in kept)

def docstring_lines(source: str) -> int:
    """Lines of ``source`` that belong to a module, class or function docstring."""
    import ast
    count = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            count += node.body[0].end_lineno - node.body[0].lineno + 1
    return count

def copyout(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py copyout", description="The size of one class copied out of lowrank_adam.py with "
                  "what it needs: by sections (the imports and the core, the class's section and the sections it "
                  "uses, as the README says to copy) and by definitions (only the top-level definitions it reaches, "
                  "transitively: the smallest copy that works). Lines as wc -l counts them, docstrings included.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    add_classes_flag(p)
    own = p.parse_args(argv)
    rows = ["| optimizer | by sections | by definitions | of which docstrings | blank |", "|---|---|---|---|---|"]
    for name in (cls.__name__ for cls in named_classes(own.optimizer)):
        least = copy_out(name, "definitions")
        blank = sum(1 for line in least.splitlines() if not line.strip())
        rows.append(f"| {name} | {len(copy_out(name).splitlines())} | {len(least.splitlines())} "
                    f"| {docstring_lines(least)} | {blank} |")
    return "\n".join(rows)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": compare, "steps": lambda a: print(steps(a)), "memory": memory, "plot": plot,
                "peak": lambda a: print(peak(a)), "peak-one": peak_one,
                "refresh": lambda a: print(refresh(a)),
                "shard": lambda a: print(shard(a)), "shard-one": shard_one, "refresh-one": refresh_one,
                "loader": lambda a: print(loader(a)), "sketch": lambda a: print(sketch(a)),
                "subspaces": lambda a: print(subspaces(a)), "sensitivity": lambda a: print(sensitivity(a)),
                "trace": lambda a: print(trace(a)), "copyout": lambda a: print(copyout(a))}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    if argv[0] not in commands:
        tl.fail(f"unknown command {argv[0]!r}: choose from {', '.join(commands)} (see python bench.py --help)")
    try:
        return commands[argv[0]](argv[1:])
    except tl.Diverged as e:  # a run of sketch or subspaces (compare goes on past one)
        tl.fail(str(e))

if __name__ == "__main__":
    main()
