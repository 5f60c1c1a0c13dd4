"""Pretrain a small LLaMA on C4 with the optimizers of lowrank_adam: one training run.

Read it top to bottom, like nanoGPT's train.py: configuration, model, optimizers, the training step,
evaluation and logging, checkpoints, the loop and main. llama_c4.py holds the LLaMA, the C4 loader and a
run's mechanics (processes, sharded checkpoints, resume checks, Ctrl-C); bench.py compares runs with it.

examples:
  python train_tiny_llama.py                          # tiny LLaMA, AdamW, embedded corpus: 25-45 s, 2 CPU cores
  python train_tiny_llama.py --optimizer galore --rank 8 --out-dir out/galore
  python train_tiny_llama.py --resume                 # continue out/ after Ctrl-C or --stop-after
  python train_tiny_llama.py --data /data/c4/en --tokenizer /data/t5-base/tokenizer.json \\
      --model 60m --optimizer galore --rank 128 --seq-len 256 --batch-size 128 --device cuda
  torchrun --standalone --nproc_per_node 8 train_tiny_llama.py --data /data/c4/en --model 130m

Without --data it writes the documentation every Python ships (or, with --corpus packages, the installed
packages' READMEs, licences and metadata) as C4-format shards into --cache-dir, once, and trains from them
through the same loader a real C4 run uses; nothing is downloaded. A run lives in --out-dir (ckpt.pt,
metrics.jsonl); a run already there is continued with --resume, never overwritten. A run that diverges (a
NaN or Inf loss or gradient) stops, saving nothing, and renames them *.diverged.*: the same command with a
lower --lr then starts in that folder. On a terminal the steps show as a progress bar (loss, elapsed time,
ETA); piped or in a log file, as plain lines.
"""

from __future__ import annotations

import argparse, contextlib, inspect, math, os, random, re, sys, time  # noqa: E401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import llama_c4
import lowrank_adam as la
import lowrank_engine
# the mechanics of a run and the data loaders, by name (the model and the data classes: llama_c4.X)
from llama_c4 import (Dist, Diverged, HelpFormatter, MODEL_SHAPES, MuonWithAdamW, Parser, RESUME_MAY_CHANGE, Stopped,
                      agree, check_device, check_memory_modes, check_out_dir, check_replicas, check_resume,
                      continue_command, describe, fail, full_state, gather, handle_exits, load_data, load_full_state,
                      load_tokenizer, log, nothing_to_resume, open_metrics, progress_bar, read_checkpoint,
                      run_settings, say, set_aside_diverged_run, setup_distributed, shard_model, stop_on_first_ctrl_c,
                      synchronize)

# ----------------------------------------------------------------------------- configuration
# Every setting is a flag, checked before anything is read or built. MODEL_SHAPES (llama_c4.py): name -> shape.

def build_parser() -> argparse.ArgumentParser:
    """Every flag, in --help's groups (parse_args checks their values)."""
    p = Parser(prog="train_tiny_llama.py", usage="%(prog)s [--flag value ...]", description=__doc__,
               formatter_class=HelpFormatter, allow_abbrev=False)
    a = p.add_argument_group("data")
    a.add_argument("--data", help="C4 shards: a folder (searched with its subfolders), glob or file of "
                   "c4-train.*.json.gz, c4-validation.*.json.gz, .json or .jsonl; unset: the embedded corpus of --corpus")
    a.add_argument("--corpus", choices=list(llama_c4.CORPORA), help="the embedded corpus, used only without "
                   "--data (refused with it): pydoc, the documentation every Python ships; packages, the installed "
                   "packages' READMEs, licences and metadata; unset: pydoc")
    a.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lowrank_adam"),
                   help="where the embedded corpus is written")
    a.add_argument("--tokenizer", help="a local tokenizer.json (needs 'pip install tokenizers'); unset: UTF-8 bytes")
    a.add_argument("--eos-token", help="--tokenizer's end-of-document token; unset: </s>, <|endoftext|>, <eos>, [SEP]")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    a.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (per process)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--shuffle-buffer", type=int, default=1000, help="sequences in the seeded shuffle buffer")
    a.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny", choices=list(MODEL_SHAPES), help="LLaMA shape, hidden/intermediate/"
                   "heads/layers: " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in MODEL_SHAPES.items()))
    o = p.add_argument_group("optimizer")
    o.add_argument("--optimizer", default="adamw", help="; ".join(r.describe(n) for n, r in OPTIMIZERS.items()))
    o.add_argument("--lr", type=float, help="peak learning rate; unset: " + ", ".join(f"{n} {r.lr:g}"
                                                                                      for n, r in OPTIMIZERS.items()))
    o.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    o.add_argument("--beta1", type=float, default=0.9, help="Adam β1, every optimizer's (LDAdam's class: 0.908)")
    o.add_argument("--beta2", type=float, default=0.999, help="Adam β2, every optimizer's (LDAdam's class: 0.99)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    o.add_argument("--rank", type=int, help="rank of the attn/mlp matrices (adaptive: the average; adapprox: the "
                   "cap of every matrix's adaptive rank, unless --k-max-frac is given); unset: hidden/4 (adapprox: "
                   "--k-max-frac's cap)")
    # The flags below reach the optimizers with a keyword argument of that name; unset, their own default applies.
    G, A = la.GaLoreAdamW, la.Adapprox
    unset = lambda cls, name: f"; unset: {inspect.signature(cls).parameters[name].default}"
    g = p.add_argument_group("galore and adaptive")
    g.add_argument("--update-proj-gap", type=int, help="steps between subspace refreshes" + unset(G, "update_proj_gap"))
    g.add_argument("--scale", type=float, help="scale α of the low-rank update" + unset(G, "scale"))
    g.add_argument("--rank-metric", choices=sorted(la.RANK_METRICS), help="adaptive's allocation metric; unset: "
                   "explained_variance")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction,
                   help="the Fira-style out-of-subspace residual; unset: off for galore, on for adaptive")
    g.add_argument("--norm-growth-limit", type=float, help="limiter γ, 0 = off" + unset(G, "norm_growth_limit"))
    g.add_argument("--stagger", action="store_true", help="spread the subspace refreshes over the gap T (" + ", ".join(
                   staggered()) + "; or the spec NAME+stagger): matrix i refreshes at step 1, then at steps "
                   "t ≡ 1 + (i mod T) (mod T), so that each step refreshes about 1/T of the matrices and none all of "
                   "them; off by default: every matrix refreshes at steps 1, T+1, 2T+1, ..., the papers' schedule")
    d = p.add_argument_group("ldadam")
    d.add_argument("--rho", type=float, help="weight of the previous subspace" + unset(la.LDAdam, "rho"))
    d.add_argument("--error-feedback", action=argparse.BooleanOptionalAction,
                   help="carry what each step's projection drops into the next gradient; unset: on")
    d.add_argument("--error-dtype", choices=["fp32", "bf16"], help="error-feedback buffer dtype; unset: float32 "
                   "(float64 for a float64 model)")
    x = p.add_argument_group("adapprox")
    x.add_argument("--k-max-frac", type=float, help="largest rank / min(m, n), in place of --rank" +
                   unset(A, "k_max_frac"))
    x.add_argument("--err-tol", type=float, help="relative error target of the rank rule" + unset(A, "err_tol"))
    x.add_argument("--rank-init", type=int, help="initial rank; unset: the largest")
    x.add_argument("--clip-threshold", type=float, help="update clipping d, 0 = off" + unset(A, "clip_threshold"))
    x.add_argument("--cosine-guidance", action=argparse.BooleanOptionalAction,
                   help="scale each update by 1 + cos(M, G), the first moment's agreement with the gradient; unset: off")
    s = p.add_argument_group("schedule")
    s.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    s.add_argument("--warmup-steps", type=int, help="linear warmup steps, fewer than --max-steps; unset: 30, "
                   "or a tenth of --max-steps when that is fewer")
    s.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of the peak lr")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and optimizer randomness")
    c = p.add_argument_group("output and checkpoints")
    c.add_argument("--out-dir", default="out", help="this run's folder: ckpt.pt and metrics.jsonl (a run that "
                   "diverges renames them ckpt.diverged.pt and metrics.diverged.jsonl)")
    c.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint, "
                   "with the settings saved there (a flag given with another value is refused; a folder without "
                   "a checkpoint too)")
    c.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps; unset: at --max-steps")
    c.add_argument("--save-interval", type=int, default=0, help="also checkpoint every N steps (0 = only at the end)")
    c.add_argument("--eval-interval", type=int, default=100, help="steps between validation evaluations")
    c.add_argument("--log-interval", type=int, default=10, help="steps between train-loss lines")
    c.add_argument("--quiet", action="store_true", help="no train-loss lines, nor a progress bar on a terminal "
                   "(evaluations and messages still print)")
    y = p.add_argument_group("system")
    y.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    y.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="autocast on CUDA")
    y.add_argument("--compile", action="store_true", help="torch.compile the model")
    y.add_argument("--threads", type=int, default=0, help="CPU threads; 0: 1 for the tiny model on CPU, else torch's")
    y.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    y.add_argument("--layerwise", action="store_true", help="step each parameter inside backward and free its gradient "
                   "(gradients never coexist); one process, --grad-clip 0, --grad-accum 1, not adaptive/adafactor")
    y.add_argument("--zero", action="store_true", help="under torchrun: shard the optimizer state across the "
                   "processes (ZeRO-1, torch's ZeroRedundancyOptimizer); each rank steps its own parameters")
    y.add_argument("--fsdp", action="store_true", help="under torchrun: shard the weights, gradients and optimizer "
                   "state across the processes (FSDP2, torch's fully_shard: each block, then the model); a low-rank "
                   "matrix is stepped whole on one owner rank, which alone holds its state")
    return p

# Range checks of every flag that has a value: (flags, test, what they must be).
RULES = [(("seq_len", "batch_size", "grad_accum", "val_batches", "max_steps", "eval_interval", "log_interval", "rank",
           "update_proj_gap", "rank_init", "stop_after"), lambda v: v >= 1, "an integer >= 1"),
         (("shuffle_buffer", "warmup_steps", "save_interval", "threads"), lambda v: v >= 0, "an integer >= 0"),
         (("weight_decay", "grad_clip", "norm_growth_limit", "err_tol", "clip_threshold", "peak_tflops"),
          lambda v: 0 <= v < math.inf, "a number >= 0"),
         (("lr", "scale"), lambda v: 0 < v < math.inf, "a number > 0"),
         (("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
         (("rho", "min_lr_ratio"), lambda v: 0 <= v <= 1, "in [0, 1]"),
         (("k_max_frac",), lambda v: 0 < v <= 1, "in (0, 1]")]

def parse_args(argv=None, saved: Optional[dict] = None) -> argparse.Namespace:
    """The flags, each checked, with --lr and --rank resolved to this run's numbers.
    ``saved``: the settings of the run being resumed, which are the defaults of every
    flag a resume may not change. Reads and writes no file (check_out_dir does, for a run)."""
    parser = build_parser()
    if saved:
        dests = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in dests and k not in RESUME_MAY_CHANGE})
    args = parser.parse_args(argv)
    for names, ok, must in RULES:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):  # `not ok` also catches NaN
                fail(f"--{name.replace('_', '-')} {value}: must be {must}")
    if args.eos_token and not args.tokenizer:
        fail("--eos-token names a token of --tokenizer, which is not given")
    if args.data is not None and args.corpus is not None:
        fail(f"--corpus {args.corpus} picks the embedded corpus, which --data replaces: give one of them")
    args.corpus = None if args.data is not None else args.corpus or "pydoc"
    if args.warmup_steps is None:
        args.warmup_steps = min(30, args.max_steps // 10)
    elif args.warmup_steps >= args.max_steps:
        fail(f"--warmup-steps {args.warmup_steps} with --max-steps {args.max_steps}: the lr would never reach its "
             "peak; use fewer warmup steps than --max-steps")
    try:
        name = parse_optimizer(args.optimizer)[0]
        recipe = OPTIMIZERS[name]
        if args.stagger and name not in staggered():
            fail(f"--stagger: {name} has no staggered refresh schedule (an option of {' and '.join(staggered())} "
                 "only): drop --stagger (bench.py: name it per spec, e.g. galore+stagger)")
        args.lr = args.lr or recipe.lr
        if args.rank is None and recipe.lowrank is not None:  # (adapprox: unset, its rank cap is --k-max-frac's)
            args.rank = MODEL_SHAPES[args.model][0] // 4
        model = build_model(args, vocab_size=64, device="meta")
        check_rank(args, model)
        build_optimizer(args, model)  # its own checks, allocating nothing
        if args.data is not None:
            llama_c4.find_shards(args.data)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    check_device(args.device)
    check_memory_modes(args, recipe.cls)
    return args

def check_rank(args, model: nn.Module) -> None:
    """--rank must fit every matrix it projects (or caps, in Adapprox): a larger one would be cut to the
    matrix's short side, where the projected state is larger than AdamW's."""
    if not OPTIMIZERS[parse_optimizer(args.optimizer)[0]].lowrank and rank_cap(args) is None:
        return
    side = min(min(p.shape) for g in la.lowrank_groups(model, args.rank) if g["rank"] is not None for p in g["params"])
    if args.rank > side:
        fail(f"--rank {args.rank}: larger than {side}, the short side of the {args.model} model's attn/mlp "
             f"matrices; use at most {side}")

# ----------------------------------------------------------------------------- model
# LLaMA (llama_c4.py): RMSNorm, rotary embeddings, SwiGLU, untied head.

def build_model(args, vocab_size: int, device="cpu") -> llama_c4.Llama:
    """--model's shape; the vocabulary padded to a multiple of 64 for fast matmuls."""
    hidden, inter, heads, layers = MODEL_SHAPES[args.model]
    config = llama_c4.LlamaConfig(vocab_size=64 * math.ceil(vocab_size / 64), hidden=hidden, intermediate=inter,
                                  heads=heads, layers=layers, max_seq_len=max(args.seq_len, 64))
    with torch.device(device):
        return llama_c4.Llama(config)

# ----------------------------------------------------------------------------- optimizers
# By name: --optimizer NAME[:KIND][+SWITCH]..., e.g. adaptive:gap+noresidual.

@dataclass
class Recipe:
    """An --optimizer name: the class, its default lr, whether it takes lowrank_groups (rank groups for
    the attn/mlp matrices) or all parameters alike, and the options each :KIND or +SWITCH sets.
    ``lowrank=None`` (Adapprox): --rank, if given without --k-max-frac, caps every matrix's rank."""
    cls: type
    lr: float  # default peak lr (its paper's or ours; each method's best lr per corpus: docs/RESULTS.md)
    lowrank: Optional[bool] = False
    variants: dict = field(default_factory=dict)  # ":kind" or "+switch" -> options

    def describe(self, name: str) -> str:  # e.g. adaptive[:gap|combined|...][+residual][+noresidual]
        kinds = "|".join(v[1:] for v in self.variants if v[0] == ":")
        return name + (f"[:{kinds}]" if kinds else "") + "".join(f"[{v}]" for v in self.variants if v[0] == "+")

RESIDUAL = {"+residual": {"residual": True}, "+noresidual": {"residual": False}}
REFRESH = {"+randomized": {"refresh": "randomized"}}
STAGGER = {"+stagger": {"stagger": True}}  # (the classes that take ``stagger``: see staggered)
OPTIMIZERS = {
    "adamw": Recipe(torch.optim.AdamW, 3e-3),
    "galore": Recipe(la.GaLoreAdamW, 1e-2, lowrank=True,
                     variants={**{f":{k}": {"subspace": k} for k in la.SUBSPACES}, **RESIDUAL, **REFRESH,
                               **STAGGER, **{f"+gha_lr{v:g}": {"gha_lr": v} for v in (0.1, 1.0)}}),
    "adaptive": Recipe(la.AdaptiveAdamW, 1e-2, lowrank=True,
                       variants={**{f":{m}": {"rank_metric": m} for m in sorted(la.RANK_METRICS)}, **RESIDUAL,
                                 **REFRESH, **STAGGER}),
    "ldadam": Recipe(la.LDAdam, 3e-3, lowrank=True, variants={"+noef": {"error_feedback": False},
                                                               "+std": {"proj_type": "std"}}),  # squares: columns
    "adapprox": Recipe(la.Adapprox, 3e-3, lowrank=None,  # --rank: a group of the matrices, capping their ranks
                       variants={**{f":{r}": {"nonneg": r} for r in la.NONNEG_RULES},  # how Q Uᵀ is made >= 0
                                 "+nomoment": {"betas": (0.0, 0.999)},  # no first moment
                                 "+cold": {"warm_start": False, "power_iters": 5},
                                 "+noscaling": {"row_col_scaling": False},  # V factored as is
                                 "+float32": {"factor_dtype": "float32"}}),  # V in float32
    "adafactor": Recipe(torch.optim.Adafactor, 1e-2),  # torch's; its lr is relative to the weights' RMS
}
if hasattr(torch.optim, "Muon"):  # torch >= 2.9
    OPTIMIZERS["muon"] = Recipe(MuonWithAdamW, 3e-3, lowrank=True)

def staggered() -> list[str]:
    """The optimizers whose class takes ``stagger`` (--stagger, the +stagger variant)."""
    return [n for n, r in OPTIMIZERS.items() if "stagger" in inspect.signature(r.cls).parameters]

def parse_optimizer(spec: str) -> tuple[str, dict]:
    """``NAME[:KIND][+SWITCH]...`` -> (NAME, the options its variants set)."""
    name, *variants = re.split(r"(?=[:+])", spec)
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {spec}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    options, known = {}, OPTIMIZERS[name].variants
    for v in variants:
        if v not in known:
            raise ValueError(f"--optimizer {spec}: {name} has no variant {v}" +
                             (f"; it has {', '.join(known)}" if known else ""))
        options.update(known[v])
    return name, options

def optimizer_options(args) -> tuple[Recipe, dict]:
    """The recipe of --optimizer, and its keyword arguments: every set flag that
    names one (0 = None for the two "0 = off" flags), then its variants' options."""
    name, options = parse_optimizer(args.optimizer)
    recipe = OPTIMIZERS[name]
    flags = {**vars(args), "betas": (args.beta1, args.beta2), "error_dtype": {"fp32": torch.float32, "bf16":
             torch.bfloat16}.get(args.error_dtype)}
    takes = inspect.signature(recipe.cls).parameters
    kwargs = {k: None if v == 0 and k in ("norm_growth_limit", "clip_threshold") else v
              for k, v in flags.items() if k in takes and v is not None}
    return recipe, {**kwargs, **options}

def build_optimizer(args, model: nn.Module, zero: bool = False) -> torch.optim.Optimizer:
    """--optimizer for ``model``; ``zero``: wrapped in ZeroRedundancyOptimizer (under torchrun)."""
    recipe, kwargs = optimizer_options(args)
    cls, params = recipe.cls, list(model.parameters())
    if recipe.lowrank:
        params = la.lowrank_groups(model, args.rank)
    elif rank_cap(args) is not None:  # Adapprox: the same matrices factored as without --rank, the cap on each
        params = [{"params": [p for p in params if p.dim() == 2], "rank": rank_cap(args)},
                  {"params": [p for p in params if p.dim() != 2]}]  # (only matrices may be in a 'rank' group)
    if args.layerwise and cls is torch.optim.AdamW:
        # torch's AdamW cannot step one parameter; GaLoreAdamW's groups without 'rank' get exactly its update
        cls = la.GaLoreAdamW
        kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters}
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)

def rank_cap(args) -> Optional[int]:
    """--rank where it caps the rank of every matrix (Adapprox, a recipe with lowrank=None): if it is
    given and --k-max-frac is not (in a compare of several optimizers, --rank is for the others)."""
    unset = args.rank is None or args.k_max_frac is not None
    return None if unset or OPTIMIZERS[parse_optimizer(args.optimizer)[0]].lowrank is not None else args.rank

def get_lr(it: int, base: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup, then a cosine decay to the floor base·min_ratio, which holds from max_steps on."""
    if it < warmup:
        return base * (it + 1) / (warmup + 1)
    progress = min(1.0, (it - warmup) / max(1, max_steps - warmup))  # (cos π = -1 exactly: the floor)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

# ----------------------------------------------------------------------------- training
# The run's state (model, optimizer, data, counters) and one optimizer step.

class Run:
    """One training run: what the loop's steps share and a checkpoint saves."""
    def __init__(self, args, vocab_size: int, dist: Dist):
        self.args, self.dist, self.device = args, dist, torch.device(dist.device)
        torch.manual_seed(args.seed)  # the same initial weights for every optimizer at this seed
        self.raw_model = build_model(args, vocab_size).to(self.device)  # what is evaluated and saved
        if args.fsdp:  # its parameters become DTensors, each rank holding its rows; the optimizer sees those
            shard_model(self.raw_model)
        self.opt = build_optimizer(args, self.raw_model, zero=args.zero)
        self.local_opt = getattr(self.opt, "optim", self.opt)  # --zero: this rank's shard of the optimizer
        if args.layerwise:  # each parameter stepped in backward; its time counts as optimizer time
            step_parameter, self.layerwise_hooks = self.opt.step_parameter, lowrank_engine.layerwise_hooks(self.opt)
            self.opt.step_parameter = lambda p: self.timed(step_parameter, p, sync=False)  # no sync per parameter
        self.model = torch.compile(self.raw_model) if args.compile else self.raw_model  # what trains
        if dist.ddp and not args.fsdp:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        amp = self.device.type == "cuda" and args.dtype != "float32"
        self.ctx = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if amp else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and args.dtype == "float16")
        # optimizer steps; the data (a llama_c4.Prefetch); the progress bar while train() steps on a terminal
        self.step, self.batches, self.bar = 0, None, None
        self.seconds, self.step_seconds = 0.0, 0.0  # training time of earlier invocations; time in opt.step()
        self.started = self.last_log_time = time.perf_counter()
        self.last_log_step, self.train_loss, self.last_eval = 0, math.nan, (-1, math.nan)
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist.world

    def train_seconds(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def timed(self, step, *args, sync: bool = True) -> None:
        """Run an optimizer step and count its time; ``sync``: the GPU's work, not the queueing of it."""
        if sync:
            synchronize(self.device)
        t0 = time.perf_counter()
        step(*args)
        if sync:
            synchronize(self.device)
        self.step_seconds += time.perf_counter() - t0

def train_step(run: Run, batches) -> tuple[float, torch.Tensor]:
    """One optimizer step over --grad-accum micro-batches: (lr, summed loss)."""
    args, opt = run.args, run.opt
    lr = get_lr(run.step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(args.grad_accum):
        x, y = next(batches)
        if args.fsdp:  # reduce-scatter the gradients on the last micro-step only
            run.raw_model.set_requires_gradient_sync(micro == args.grad_accum - 1)
        elif run.dist.ddp:  # all-reduce the gradients on the last micro-step only
            run.model.require_backward_grad_sync = micro == args.grad_accum - 1
        with run.ctx:
            _, loss = run.model(x.to(run.device), y.to(run.device))
            loss = loss / args.grad_accum
        run.scaler.scale(loss).backward()  # --layerwise: every parameter is updated in here
        loss_sum += loss.detach()
    norm = None
    if args.grad_clip > 0 and not args.layerwise:
        run.scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    check_finite(run, loss_sum, norm)
    if not args.layerwise:  # (--layerwise: every parameter was updated in backward)
        run.timed(run.scaler.step, opt)
        run.scaler.update()
        opt.zero_grad(set_to_none=True)
    run.step += 1
    return lr, loss_sum

def check_finite(run: Run, loss: torch.Tensor, norm: Optional[torch.Tensor]) -> None:
    """Stop a diverged run before the update: a NaN or Inf loss or --grad-clip's gradient norm (without
    it the low-rank optimizers check every gradient, and torch's show it in the next loss). One number
    per step; under a GradScaler (fp16) an Inf gradient only skips the step: the loss alone counts."""
    if norm is not None and not run.scaler.is_enabled():
        loss = loss + (norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # --fsdp: a DTensor
    if agree(not math.isfinite(loss.item()), run.dist):  # every rank stops at the same step
        raise Diverged(run.step + 1)

# ----------------------------------------------------------------------------- evaluation and logging
# metrics.jsonl holds every row (rank 0 writes it); a terminal shows a bar, anything else plain lines.

@torch.no_grad()
def evaluate(run: Run, val: list) -> float:
    """Mean loss per validation sequence."""
    run.model.eval()
    total = 0.0
    for x, y in val:
        with run.ctx:
            total += run.raw_model(x.to(run.device), y.to(run.device))[1].item() * len(x)
    if run.args.fsdp:  # FSDP2 keeps the root's weights gathered after a forward without backward: shard them again
        run.raw_model.reshard()  # (else they stay whole in memory, and named_parameters lists those stand-ins)
    run.model.train()
    return total / sum(len(x) for x, _ in val)

def log_train(run: Run, lr: float, loss: torch.Tensor, metrics) -> None:
    """A metrics row and, unless --quiet, a line: the loss, lr and tokens/s since the last one."""
    now = time.perf_counter()
    tokens_per_s = (run.step - run.last_log_step) * run.tokens_per_step / max(now - run.last_log_time, 1e-9)
    run.last_log_time, run.last_log_step, run.train_loss = now, run.step, float(loss)
    row = dict(step=run.step, train_loss=run.train_loss, lr=lr, tokens_per_s=tokens_per_s)
    if hasattr(run.opt, "ranks"):  # (not under --zero: each rank holds only its shard)
        row["ranks"] = run.opt.ranks()
    log(metrics, **row)
    if run.bar is not None:  # a terminal: the bar's postfix instead of a line
        run.bar.set_postfix_str(f"loss={run.train_loss:.4f}, lr={lr:.2e}, {tokens_per_s:,.0f} tokens/s")
    elif run.dist.master and not run.args.quiet:
        print(f"step {run.step}/{run.args.max_steps}: train loss {run.train_loss:.4f}, lr {lr:.2e}, "
              f"{tokens_per_s:,.0f} tokens/s", flush=True)

def log_eval(run: Run, val_loss: float, metrics) -> None:
    run.last_eval, ppl = (run.step, val_loss), math.exp(min(val_loss, 50))
    log(metrics, step=run.step, val_loss=val_loss, val_ppl=ppl)
    if run.dist.master:
        say(f"step {run.step}: val loss {val_loss:.4f}, val ppl {ppl:.2f}")

def ranked_parameter_names(run: Run) -> list[str]:
    """Names of the parameters whose ranks ``opt.ranks()`` lists, in its order."""
    if not hasattr(run.opt, "ranks"):
        return []
    names = {id(p): n for n, p in run.raw_model.named_parameters()}
    if isinstance(run.opt, la.Adapprox):
        return [names[id(p)] for g in run.opt.param_groups for p in g["params"] if la.Adapprox.is_factored(p, g)]
    return [names[id(p)] for g in run.opt.param_groups if g.get("rank") is not None for p in g["params"]]

# ----------------------------------------------------------------------------- checkpoints
# Atomic, exact to resume (model, optimizer, scaler, step, data position, RNG); reading one, checking a
# resume's flags against it, and gathering a sharded run's state: llama_c4.py.

def save_checkpoint(run: Run, result: Optional[dict] = None) -> None:
    """Everything an exact resume needs (the data position of every rank too); ``result`` marks a
    complete run. Every rank calls it (under --zero and --fsdp each sends rank 0 its shards); rank 0
    writes a temporary file, then renames it over the old checkpoint."""
    model_state, optimizer_state = full_state(run.raw_model, run.opt, run.dist, run.args.fsdp, run.args.zero)
    data = llama_c4.saveable(run.batches.state)
    data = gather(data, run.dist) if run.dist.ddp else data  # DDP: every rank's position (each reads its own slice)
    if not run.dist.master:
        return
    path = Path(run.args.out_dir) / "ckpt.pt"
    torch.save({"model": model_state, "optimizer": optimizer_state,
                "scaler": run.scaler.state_dict(), "settings": run_settings(run.args), "step": run.step,
                "data": data, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "timing": {"seconds": run.train_seconds(), "step_seconds": run.step_seconds}, "result": result},
               path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)

def restore(run: Run, ckpt: dict, batches: llama_c4.TrainBatches) -> None:
    """The run where the checkpoint left it, the data position of this rank too: no replay of the stream."""
    load_full_state(run.raw_model, run.opt, ckpt["model"], ckpt["optimizer"], run.dist, run.args.fsdp)
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.seconds, run.step_seconds = ckpt["step"], ckpt["timing"]["seconds"], ckpt["timing"]["step_seconds"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    batches.load_state_dict(llama_c4.resumed_data(ckpt["data"], run.dist.rank, run.dist.world))

# ----------------------------------------------------------------------------- the loop
# train() steps to --max-steps (or --stop-after) and finish() ends the invocation.

def train(args, data: llama_c4.C4Data, val: list, dist: Dist, ckpt: Optional[dict] = None,
          on_step=None) -> dict:
    """One run in --out-dir: build or resume it, step to --max-steps (or --stop-after), evaluate,
    save; returns its result. ``on_step``: called with the run after each step (bench.py sketch)."""
    run = Run(args, data.tokenizer.vocab_size, dist)
    batches = data.train_batches(args.batch_size, args.seed, args.shuffle_buffer)
    if ckpt is not None:
        restore(run, ckpt, batches)
        if ckpt["result"] is not None:  # complete: nothing to train
            return ckpt["result"]
        if dist.master:
            say(f"resumed from step {run.step} of {args.max_steps}")
        if dist.master and ckpt["settings"]["processes"] != dist.world:  # --fsdp on another number of ranks
            say(llama_c4.resharded(ckpt["settings"]["processes"], dist.world, run.tokens_per_step))
    elif args.resume and dist.master:  # (bench.py compare --resume: a run not begun yet; main refuses this)
        say(f"--resume: no checkpoint in {args.out_dir} yet, so the run starts there")
    run.batches = llama_c4.Prefetch(batches)  # tokenized ahead, in a background thread
    metrics = open_metrics(Path(args.out_dir) / "metrics.jsonl", run.step, dist.master)
    if run.step == 0:
        log(metrics, step=0, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
            rank_names=ranked_parameter_names(run))
    stop_at = args.max_steps if args.stop_after is None else min(args.max_steps, run.step + args.stop_after)
    run.started, run.last_log_time, run.last_log_step = time.perf_counter(), time.perf_counter(), run.step
    run.bar = progress_bar(args.max_steps, run.step, dist.master and not args.quiet)  # on a terminal
    try:
        with stop_on_first_ctrl_c() as stop_requested:
            while run.step < stop_at and not agree(stop_requested(), dist):
                try:
                    lr, loss = train_step(run, run.batches)
                except la.NonFiniteGradientError:  # the optimizer's own check (--grad-clip 0 leaves it the gradients)
                    raise Diverged(run.step + 1) from None
                if run.bar is not None:
                    run.bar.update()
                if run.step % args.log_interval == 0 or run.step == args.max_steps:
                    log_train(run, lr, loss, metrics)
                if run.step % args.eval_interval == 0 or run.step == args.max_steps:
                    log_eval(run, evaluate(run, val), metrics)
                if args.save_interval and run.step % args.save_interval == 0:
                    save_checkpoint(run)
                if on_step is not None:
                    on_step(run)
            interrupted = agree(stop_requested(), dist)
    except Diverged as e:  # nothing is saved: the weights are not finite, or about to be
        log(metrics, step=e.step, diverged=True)
        if metrics is not None:
            metrics.close()
        raise Diverged(e.step, set_aside_diverged_run(args, e.step) if dist.master else "") from None
    finally:  # the bar ends here, also on an error or a second Ctrl-C: what follows prints as lines
        if run.bar is not None:
            run.bar.close()
            run.bar = None
        run.batches.close()
    return finish(run, val, metrics, interrupted)

def finish(run: Run, val: list, metrics, interrupted: bool) -> dict:
    """The end of this invocation: a checkpoint, with the result once the run is complete."""
    args, path = run.args, Path(run.args.out_dir) / "ckpt.pt"
    rerun = f"checkpoint saved to {path}; continue with: {continue_command(args)}"
    if interrupted:
        save_checkpoint(run)
        if run.dist.master:
            say(f"interrupted at step {run.step} of {args.max_steps}: {rerun}")
        raise Stopped
    if run.dist.ddp and not args.fsdp:  # (--fsdp: no replicas, each rank holds its own rows of every weight)
        check_replicas(run.raw_model, run.dist)
    val_loss = run.last_eval[1] if run.last_eval[0] == run.step else evaluate(run, val)
    result, complete = result_of(run, val_loss), run.step == args.max_steps
    save_checkpoint(run, result if complete else None)
    if run.dist.master:
        if complete:
            log(metrics, step=run.step, final=result)
        else:
            say(f"stopped at step {run.step} of {args.max_steps} (--stop-after {args.stop_after}): {rerun}")
        metrics.close()
    return result

def result_of(run: Run, val_loss: float) -> dict:
    """The numbers that describe a run (bench.py tabulates them); times cover every invocation."""
    args, device, seconds, names = run.args, run.device, run.train_seconds(), ranked_parameter_names(run)
    result = dict(optimizer=args.optimizer, seed=args.seed, lr=args.lr, steps=run.step, val_loss=val_loss,
                  val_ppl=math.exp(min(val_loss, 50)), train_loss=run.train_loss,
                  tokens_per_s=run.step * run.tokens_per_step / max(seconds, 1e-9),
                  step_ms=1e3 * run.step_seconds / max(run.step, 1), state_mb=la.state_bytes(run.local_opt) / 2**20,
                  data_wait_ms=1e3 * run.batches.wait / max(run.step, 1),
                  seconds=seconds, params=sum(p.numel() for p in run.raw_model.parameters()),
                  peak_cuda_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    if device.type == "cuda" and args.peak_tflops:
        result["mfu"] = result["tokens_per_s"] * run.raw_model.flops_per_token(args.seq_len) / (args.peak_tflops * 1e12)
    if names:
        result["ranks"] = dict(zip(names, run.opt.ranks()))
    if run.dist.ddp:  # what each rank holds: the same under DDP, a shard under --zero and --fsdp
        result["state_bytes_per_rank"] = gather(la.state_bytes(run.local_opt), run.dist)
    return result

# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ckpt = read_checkpoint(argv)  # with --resume: the run's own settings are the defaults
    args = parse_args(argv, ckpt["settings"] if ckpt else None)  # every flag checked before data is read
    if args.resume and ckpt is None:
        fail(nothing_to_resume(Path(args.out_dir)))
    check_resume(args, ckpt)
    tokenizer = load_tokenizer(args)
    out_existed = Path(args.out_dir).exists()
    check_out_dir(args)
    if ckpt is not None and ckpt["result"] is not None:  # a complete run: nothing to train
        if os.environ.get("RANK", "0") == "0":
            print(f"{args.out_dir} is complete ({ckpt['step']} steps); its saved result:\n{describe(ckpt['result'])}")
        return ckpt["result"]
    dist = setup_distributed(args)
    with handle_exits(args, dist, out_existed):  # Ctrl-C: status 130; divergence, data run dry: 1, one line
        data, val = load_data(args, tokenizer, dist)
        result = train(args, data, val, dist, ckpt)
        if dist.master:
            print(describe(result))
            if skipped := data.stats.report():
                print(skipped)
        return result

if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:  # under torchrun, all written: skip the interpreter's teardown, where
        sys.stdout.flush(), sys.stderr.flush()  # torch's on gloo now and then aborts after FSDP2 (SIGABRT:
        os._exit(0)                             # torchrun would report the run as failed)
