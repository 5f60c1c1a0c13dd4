"""Compare runs of train_tiny_llama.py: optimizers side by side, step() timings,
optimizer-state memory, plots. Each subcommand prints a markdown table (or
writes PNGs); `python bench.py COMMAND --help` lists its flags.

commands:
  compare   train several runs from the same initial weights and data order and
            tabulate them: every optimizer of --optimizer (a comma list of
            train_tiny_llama.py specs) at every lr of --lr-sweep, for --seeds
            seeds, reported as the median over seeds ± half the range, with
            each optimizer at its best lr. Every other flag goes to each run.
  steps     time optimizer.step() alone on --model's attn/mlp matrices with
            random gradients: normal, refresh (SVD) and amortized, against AdamW
  memory    optimizer state of every method for the 60m-1b shapes, from the
            per-matrix formulas (tested equal to state_bytes after a real step)
  plot      loss curves, AdaptiveAdamW's rank heatmap and Adapprox's ranks of
            the runs in --out-dir (needs matplotlib)

examples:
  python bench.py compare --optimizer adamw,galore,adaptive --seeds 3 --rank 8
  python bench.py compare --optimizer adamw,galore+residual --lr-sweep 0.5,1,2 --out-dir out/sweep
  python bench.py steps --model 60m --rank 128 --optimizer adamw,galore,adaptive,ldadam,adapprox
  python bench.py memory
  python bench.py plot --out-dir out/compare
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import lowrank_adam as la
import train_tiny_llama as tl

# ----------------------------------------------------------------------------- compare: runs side by side

def plan_runs(own, rest: list[str]) -> list:
    """The checked flags of every run: each spec x lr factor x seed, in its own folder."""
    specs = [s.strip() for s in own.optimizer.split(",") if s.strip()]
    try:
        factors = [float(f) for f in own.lr_sweep.split(",")]
    except ValueError:
        tl.fail(f"--lr-sweep {own.lr_sweep}: not a comma list of numbers")
    if not specs or own.seeds < 1 or not all(0 < f < math.inf for f in factors):
        tl.fail("compare needs at least one --optimizer, --seeds >= 1 and --lr-sweep factors > 0")
    runs = []
    for seed in range(own.seed, own.seed + own.seeds):
        for spec in specs:
            for factor in factors:
                try:
                    lr = tl.peak_lr(spec, own.lr) * factor
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
    p.add_argument("--lr", help="a number, or NAME=LR pairs; unset: each optimizer's default")
    p.add_argument("--lr-sweep", default="1", help="comma list of factors on each optimizer's lr, e.g. 0.5,1,2")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="run seeds --seed ... --seed + N - 1")
    p.add_argument("--out-dir", default="out/compare", help="one folder per run inside, and results.json")
    p.add_argument("--plot", action="store_true", help="also write the plots of `bench.py plot` (needs matplotlib)")
    own, rest = p.parse_known_args(argv)
    runs = plan_runs(own, rest)  # every run's flags checked before any trains
    if own.plot:
        import_pyplot()
    tokenizer = tl.load_tokenizer(runs[0])
    for args in runs:
        tl.check_out_dir(args)
        tl.resume_checkpoint(args)  # refuses a mismatched resume now, not after hours of other runs
    dist = tl.setup_distributed(runs[0])
    data, val = tl.load_data(runs[0], tokenizer, dist)
    results = []
    try:
        for args in runs:
            ckpt = tl.resume_checkpoint(args)
            results.append(tl.train(args, data, val, dist, ckpt))
            if dist.master:
                saved = " (complete before: the saved result)" if ckpt is not None and ckpt["result"] else ""
                print(tl.describe(results[-1]) + saved)
    except KeyboardInterrupt:
        sys.exit(130)
    except tl.DataError as e:
        tl.fail(str(e))
    if dist.master:
        tl.report_data(data.stats)
        if len(results) > 1:
            print(summarize(results))
        (Path(own.out_dir) / "results.json").write_text(json.dumps(results, indent=1))
        if own.plot:
            for path in make_plots(Path(own.out_dir)):
                print(f"wrote {path}")
    return results

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

def time_steps(opt, params, grads, count: int, device: torch.device) -> list[float]:
    """Seconds of each of ``count`` calls of opt.step() on the fixed gradients."""
    times = []
    for _ in range(count):
        for p, g in zip(params, grads):
            p.grad = g
        tl.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        tl.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times

def steps(argv: list[str]) -> str:
    p = tl.Parser(prog="bench.py steps", description="step() time on --model's attn/mlp matrices; any other flag "
                  "(see train_tiny_llama.py --help: --model, --rank, --device, optimizer options) applies too.",
                  formatter_class=tl.HelpFormatter, allow_abbrev=False)
    p.add_argument("--optimizer", default="adamw,galore,adaptive,ldadam,adapprox", help="comma list of specs")
    p.add_argument("--steps", type=int, default=5, help="normal steps timed (their median is reported)")
    own, rest = p.parse_known_args(argv)
    if own.steps < 1:
        tl.fail(f"--steps {own.steps}: must be an integer >= 1")
    runs = [tl.parse_args([*rest, "--optimizer", spec]) for spec in own.optimizer.split(",")]
    device = torch.device("cuda" if runs[0].device == "auto" and torch.cuda.is_available() else
                          "cpu" if runs[0].device == "auto" else runs[0].device)
    tl.set_threads(runs[0], device.type)
    torch.manual_seed(runs[0].seed)
    model = tl.build_model(runs[0], 320, device)
    params = la.lowrank_groups(model, runs[0].rank)[-1]["params"]  # the attn/mlp matrices
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    rows, gap = {}, None
    for args in runs:
        recipe, kwargs = tl.optimizer_options(args)
        refreshes = "update_proj_gap" in inspect.signature(recipe.cls).parameters
        gap = kwargs.get("update_proj_gap", inspect.signature(la.GaLoreAdamW).parameters["update_proj_gap"].default)
        kwargs.update(lr=1e-5, **({"update_proj_gap": own.steps + 1} if refreshes else {}),
                      **({"foreach": True} if recipe.cls is torch.optim.AdamW else {}))
        opt = recipe.cls([{"params": params, "rank": args.rank}] if recipe.lowrank else params, **kwargs)
        normal = time_steps(opt, params, grads, own.steps + 1, device)[1:]  # step 1 allocates state (and SVDs)
        normal_ms = 1e3 * statistics.median(normal)
        refresh_ms = 1e3 * time_steps(opt, params, grads, 1, device)[0] if refreshes else None  # step steps+2
        amortized = (refresh_ms + (gap - 1) * normal_ms) / gap if refreshes else normal_ms
        rows[args.optimizer] = (normal_ms, refresh_ms, amortized)
    return steps_table(rows, runs[0], len(params), device, own.steps, gap)

def steps_table(rows: dict, args, matrices: int, device, count: int, gap: int) -> str:
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    adamw = rows.get("adamw")
    base = (adamw[0], adamw[0], adamw[2]) if adamw else None  # AdamW has no refresh: its normal step is the base
    lines = [f"step() on the {matrices} attn/mlp matrices of {args.model} (rank {args.rank}, {device}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads); median of {count} normal steps; refresh = the "
             f"SVD step, amortized over T = {gap}", "",
             "| optimizer | normal ms | refresh ms | amortized ms | normal / AdamW | refresh / AdamW | "
             "amortized / AdamW |", "|---|---|---|---|---|---|---|"]
    for name, times in rows.items():
        ratios = [None if t is None or base is None else t / b for t, b in zip(times, base or times)]
        lines.append(f"| {name} | " + " | ".join(map(fmt, times)) + " | " + " | ".join(map(fmt, ratios)) + " |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- memory: optimizer state per method

PUBLISHED_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}

def predicted_state_bytes(model: torch.nn.Module, method: str, rank: int, *, beta1: float = 0.9,
                          error_bytes: int = 4, k_max_frac: float = 0.25) -> int:
    """Optimizer state in bytes from SPEC §5's per-matrix formulas, float32 state.

    Equal to ``state_bytes`` after a real step (tested on small configs).
    AdaptiveAdamW is counted at uniform ranks (its total moves with the
    allocation, since matrices differ in their long side); Adapprox at its
    largest rank k_max (the rank rule can only lower it).
    """
    f = 4
    lowrank = {id(p) for g in la.lowrank_groups(model, rank) if "rank" in g for p in g["params"]}
    total = 0
    for p in model.parameters():
        if method == "adamw":
            total += 2 * f * p.numel() + 4  # m, v and torch's float32 step tensor
        elif method == "adapprox" and la.Adapprox.is_factored(p):
            m, n = p.shape
            k = max(1, int(k_max_frac * min(m, n)))
            total += f * (k * (m + n) + (m * n if beta1 > 0 else 0))
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
    for name in configs:
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
    return "\n".join(rows)

def memory(argv: list[str]) -> str:
    tl.Parser(prog="bench.py memory", description="Optimizer state of every method for the 60m-1b shapes at their "
              "published ranks and at ranks 4 and 8 (float32 state, 32k vocabulary).").parse_args(argv)
    table = memory_table()
    print(table)
    return table

# ----------------------------------------------------------------------------- plot: loss curves and ranks

def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        tl.fail("plots need matplotlib, which is not installed: pip install matplotlib")
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

def plot(argv: list[str]) -> list[Path]:
    p = tl.Parser(prog="bench.py plot", description="PNG plots of the runs in --out-dir.", allow_abbrev=False,
                  formatter_class=tl.HelpFormatter)
    p.add_argument("--out-dir", default="out/compare", help="a run folder, or a folder of run folders")
    written = make_plots(Path(p.parse_args(argv).out_dir))
    for path in written:
        print(f"wrote {path}")
    return written

# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": compare, "steps": lambda a: print(steps(a)), "memory": memory, "plot": plot}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    if argv[0] not in commands:
        tl.fail(f"unknown command {argv[0]!r}: choose from {', '.join(commands)} (see python bench.py --help)")
    return commands[argv[0]](argv[1:])

if __name__ == "__main__":
    main()
