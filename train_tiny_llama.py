"""Pretrain a small LLaMA on C4 shards with the optimizers of lowrank_adam.

nanoGPT-style: one file, every setting a flag with a commented default.

    python train_tiny_llama.py                          # CPU, ~2 min, embedded corpus
    python train_tiny_llama.py --optimizer adamw,galore --seeds 3     # side by side
    python train_tiny_llama.py --model 60m --data /data/c4/en --rank 128 \\
        --batch-size 64 --grad-accum 8 --seq-len 256 --max-steps 10000 --device cuda
    torchrun --standalone --nproc_per_node 8 train_tiny_llama.py --model 130m --data /data/c4/en

With no ``--data`` it builds a small corpus from the documentation that ships
with Python itself (``pydoc`` topics and the standard library's docstrings),
writes it as C4-format shards into a cache folder, and trains from those
through the same loader a real C4 run uses. Nothing is downloaded, ever.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import gzip
import json
import math
import os
import random
import signal
import statistics
import sys
import sysconfig
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_adam as la

# =============================================================================
# Model: LLaMA (RMSNorm, rotary embeddings, SwiGLU, untied head)
# =============================================================================


@dataclass
class LlamaConfig:
    vocab_size: int = 320
    hidden: int = 64
    intermediate: int = 176
    heads: int = 4
    layers: int = 4
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6


# hidden / intermediate / heads / layers; the published shapes of the GaLore and
# LDAdam experiments, plus a CPU-sized default.
MODEL_SHAPES = {
    "tiny": (64, 176, 4, 4),
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 8, 6),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x²) + eps) · w, in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_cache(seq_len: int, head_dim: int, theta: float, device=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # rotate the two halves of each head: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.q_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.hidden, bias=False)
        self.o_proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.hidden, c.norm_eps), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.hidden, c.norm_eps), MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.norm_eps)
        self.lm_head = nn.Linear(c.hidden, c.vocab_size, bias=False)  # untied
        cos, sin = rotary_cache(c.max_seq_len, c.hidden // c.heads, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self, seq_len: int) -> float:
        """6N for the matmuls plus attention scores (nanoGPT's / PaLM's estimate)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.layers * c.hidden * seq_len


# =============================================================================
# Tokenizers
# =============================================================================


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token 256. Needs no files."""

    vocab_size, eos_id, name = 257, 256, "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


class FileTokenizer:
    """A local ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str, eos_token: Optional[str]):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            sys.exit("--tokenizer needs the 'tokenizers' package: pip install tokenizers")
        if not Path(path).is_file():
            sys.exit(f"--tokenizer {path}: no such file")
        self.tok, self.name = Tokenizer.from_file(path), path
        self.vocab_size = self.tok.get_vocab_size()
        candidates = [eos_token] if eos_token else ["</s>", "<|endoftext|>", "<eos>", "[SEP]"]
        ids = [self.tok.token_to_id(t) for t in candidates if self.tok.token_to_id(t) is not None]
        if not ids:
            sys.exit(f"--tokenizer {path}: none of {candidates} is in its vocabulary; name one with --eos-token")
        self.eos_id = ids[0]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


# =============================================================================
# Data: C4 shards -> documents -> packed token sequences
# =============================================================================

SHARD_PATTERNS = ("*.json.gz", "*.jsonl.gz", "*.json", "*.jsonl")
HOLDOUT_EVERY = 100  # without validation shards, every 100th document is held out


@dataclass
class DataStats:
    documents: int = 0
    bad_lines: int = 0  # undecodable bytes or invalid JSON
    no_text: int = 0  # a JSON record without a string "text"
    bad_shards: int = 0  # unreadable / truncated files


def find_shards(spec: str) -> tuple[list[Path], list[Path]]:
    """(train shards, validation shards) from a directory, glob or file."""
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec))
    elif path.is_dir():
        files = sorted({f for pattern in SHARD_PATTERNS for f in path.rglob(pattern)})
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"--data {spec}: no such file or directory")
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"--data {spec}: no C4 shards ({', '.join(SHARD_PATTERNS)}) found there")
    val = [f for f in files if "validation" in f.name]
    return [f for f in files if f not in val], val


def read_documents(files: list[Path], stats: DataStats) -> Iterator[str]:
    """Stream the ``text`` of each JSON line; bad lines and shards are counted, not fatal."""
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        try:
            with opener(f, "rb") as fh:
                for raw in fh:
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except ValueError:  # JSONDecodeError and UnicodeDecodeError
                        stats.bad_lines += 1
                        continue
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        stats.no_text += 1
                        continue
                    stats.documents += 1
                    yield text
        except (OSError, EOFError, zlib.error) as e:
            stats.bad_shards += 1
            print(f"warning: skipping the rest of {f}: {e}", file=sys.stderr)


def packed_sequences(files, tokenizer, seq_len: int, *, keep=lambda i: True, rank: int = 0, world: int = 1,
                     stats: Optional[DataStats] = None, epochs: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Documents -> tokens + end-of-document -> chunks of seq_len + 1 tokens.

    Chunks do not overlap and nothing is padded: concatenated, they are the
    token stream itself. Document i is used if ``keep(i)``; of those, rank r
    of ``world`` takes every world-th. ``epochs=None`` repeats forever.
    """
    stats = stats if stats is not None else DataStats()
    epoch = 0
    while epochs is None or epoch < epochs:
        buf: list[int] = []
        used, emitted = 0, 0
        for i, text in enumerate(read_documents(files, stats)):
            if not keep(i):
                continue
            used += 1
            if (used - 1) % world != rank:
                continue
            buf.extend(tokenizer.encode(text))
            buf.append(tokenizer.eos_id)
            while len(buf) >= seq_len + 1:
                yield torch.tensor(buf[: seq_len + 1], dtype=torch.long)
                emitted += 1
                del buf[: seq_len + 1]
        if emitted == 0:
            raise ValueError(f"the data yields no sequence of {seq_len + 1} tokens for rank {rank} "
                             f"({stats.documents} documents read): use more data or a shorter --seq-len")
        epoch += 1


def shuffled(items: Iterator, size: int, seed: int) -> Iterator:
    """A seeded shuffle buffer of ``size`` items (0 = no shuffling)."""
    rng, buf = random.Random(seed), []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def batched(seqs: Iterator[torch.Tensor], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        chunk = [s for _, s in zip(range(batch_size), seqs)]
        if len(chunk) < batch_size:
            return
        b = torch.stack(chunk)  # (B, T+1)
        yield b[:, :-1], b[:, 1:]  # inputs, next-token targets


class C4Data:
    """Train and validation streams of one data source, disjoint by construction."""

    def __init__(self, spec: str, tokenizer, seq_len: int, rank: int = 0, world: int = 1):
        self.train_files, self.val_files = find_shards(spec)
        self.tokenizer, self.seq_len, self.rank, self.world = tokenizer, seq_len, rank, world
        self.holdout = not self.val_files  # no validation shards: hold out every 100th train document
        if not self.train_files:
            self.train_files, self.holdout = self.val_files, True  # only validation shards were given
            self.val_files = []
        self.stats = DataStats()

    def train_batches(self, batch_size: int, seed: int, shuffle_buffer: int):
        keep = (lambda i: i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1) if self.holdout else (lambda i: True)
        seqs = packed_sequences(self.train_files, self.tokenizer, self.seq_len, keep=keep, rank=self.rank,
                                world=self.world, stats=self.stats)
        return batched(shuffled(seqs, shuffle_buffer, seed), batch_size)

    def val_batches(self, batch_size: int, count: int) -> list:
        if self.holdout:
            seqs = packed_sequences(self.train_files, self.tokenizer, self.seq_len,
                                    keep=lambda i: i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1, epochs=1)
        else:
            seqs = packed_sequences(self.val_files, self.tokenizer, self.seq_len, epochs=1)
        out = [b for _, b in zip(range(count), batched(seqs, batch_size))]
        if not out:
            raise ValueError("the validation stream is empty: use more data, a smaller --batch-size or --seq-len")
        return out


def python_docs() -> Iterator[tuple[str, str]]:
    """(url, text) of documentation every CPython ships: pydoc topics and the
    standard library's docstrings (read with ``ast``: nothing is imported)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        yield f"python://pydoc/topics/{key}", topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] == "site-packages" or {"test", "tests", "idle_test"} & set(parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if len(text) > 100:
            yield "python://stdlib/" + "/".join(parts), text


def build_embedded_corpus(cache_dir: Path, train_shards: int = 4) -> Path:
    """Write the Python documentation corpus as C4-format shards, once."""
    out = cache_dir / f"pydoc-c4-py{sys.version_info.major}{sys.version_info.minor}"
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    docs = list(python_docs())
    val = docs[9::20]  # every 20th document is validation
    train = [d for i, d in enumerate(docs) if i % 20 != 9]
    shards = [("c4-validation.00000-of-00001.json.gz", val)]
    shards += [(f"c4-train.{i:05d}-of-{train_shards:05d}.json.gz", train[i::train_shards]) for i in range(train_shards)]
    for name, items in shards:
        tmp = out / (name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            for url, text in items:
                fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T00:00:00Z", "url": url}) + "\n")
        os.replace(tmp, out / name)
    (out / "DONE").write_text(f"{len(docs)} documents\n")
    return out


# =============================================================================
# Optimizers by name
# =============================================================================

OPTIMIZERS = ("adamw", "galore", "adaptive", "ldadam", "adapprox")
DEFAULT_LR = {"adamw": 3e-3, "galore": 1e-2, "adaptive": 1e-2, "ldadam": 3e-3, "adapprox": 3e-3}


def parse_optimizer(spec: str) -> tuple[str, dict]:
    """``name[:metric][+residual|+noresidual][+noef]`` -> (name, option overrides).

    ``adaptive:gap`` picks AdaptiveAdamW's metric, ``+residual`` /
    ``+noresidual`` switch the Fira-style residual (galore, adaptive; the
    default is GaLore off, AdaptiveAdamW on), ``+noef`` turns LDAdam's error
    feedback off, so one command can compare variants side by side.
    """
    name, *mods = spec.split("+")
    name, _, metric = name.partition(":")
    over: dict = {}
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if metric:
        if name != "adaptive" or metric not in la.RANK_METRICS:
            raise ValueError(f"{spec}: ':metric' is for adaptive, one of {', '.join(sorted(la.RANK_METRICS))}")
        over["rank_metric"] = metric
    for mod in mods:
        if mod in ("residual", "noresidual") and name in ("galore", "adaptive"):
            over["residual"] = mod == "residual"
        elif mod == "noef" and name == "ldadam":
            over["error_feedback"] = False
        else:
            raise ValueError(f"{spec}: unknown modifier +{mod} (+residual / +noresidual for galore/adaptive, +noef for ldadam)")
    return name, over


def build_optimizer(spec: str, model: nn.Module, args, lr: float) -> torch.optim.Optimizer:
    name, over = parse_optimizer(spec)
    betas, wd = (args.beta1, args.beta2), args.weight_decay
    rank = args.rank if args.rank is not None else max(1, model.config.hidden // 4)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if name == "adapprox":
        return la.Adapprox(model.parameters(), lr=lr, betas=betas, weight_decay=wd, k_max_frac=args.k_max_frac,
                           err_tol=args.err_tol, rank_init=args.rank_init, clip_threshold=args.clip_threshold or None,
                           cosine_guidance=args.cosine_guidance, seed=args.seed)
    groups = la.lowrank_groups(model, rank)
    if name == "ldadam":
        return la.LDAdam(groups, lr=lr, betas=betas if args.ldadam_betas is None else tuple(args.ldadam_betas),
                         weight_decay=wd, rho=args.rho,
                         error_feedback=over.get("error_feedback", not args.no_error_feedback),
                         error_dtype=torch.bfloat16 if args.error_dtype == "bf16" else torch.float32)
    common = dict(lr=lr, betas=betas, weight_decay=wd, update_proj_gap=args.update_proj_gap, scale=args.scale,
                  norm_growth_limit=args.norm_growth_limit or None)
    residual = {"on": True, "off": False}.get(args.residual)  # None: the optimizer's own default
    if "residual" in over:
        residual = over["residual"]
    if residual is not None:
        common["residual"] = residual
    if name == "galore":
        return la.GaLoreAdamW(groups, **common)
    return la.AdaptiveAdamW(groups, **common, rank_metric=over.get("rank_metric", args.rank_metric))


def parse_lr(spec: Optional[str], name: str) -> float:
    """``--lr 1e-3`` for all, or ``--lr adamw=3e-3,galore=1e-2`` per optimizer
    (a variant such as ``galore+residual`` falls back to its base name)."""
    base = parse_optimizer(name)[0]
    if spec is None:
        return DEFAULT_LR[base]
    if "=" not in spec:
        return float(spec)
    table = dict(item.split("=", 1) for item in spec.split(","))
    return float(table.get(name, table.get(base, DEFAULT_LR[base])))


def get_lr(it: int, base: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    # 1) linear warmup
    if it < warmup:
        return base * (it + 1) / (warmup + 1)
    # 2) after the schedule: the floor
    if it >= max_steps:
        return base * min_ratio
    # 3) in between: cosine decay down to the floor
    progress = (it - warmup) / max(1, max_steps - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# =============================================================================
# Training
# =============================================================================


def load_checkpoint(path: Path, model_args: dict, opt_name: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, foreign pickle...
        sys.exit(f"checkpoint {path} is corrupt or not a checkpoint of this script ({type(e).__name__}: {e}); "
                 "delete it or point --out-dir elsewhere")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        sys.exit(f"checkpoint {path} is not a checkpoint of this script")
    if ckpt["model_args"] != model_args or ckpt.get("optimizer_name") != opt_name:
        sys.exit(f"checkpoint {path} is incompatible: it holds {ckpt.get('optimizer_name')} on "
                 f"{ckpt['model_args']}, this run asks for {opt_name} on {model_args}")
    return ckpt


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: write a temporary file, then rename over the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train_one(opt_name: str, seed: int, args, data: C4Data, val: list, vocab_size: int, dist: dict,
              lr_factor: float = 1.0) -> dict:
    master, device = dist["master"], torch.device(dist["device"])
    base_lr = parse_lr(args.lr, opt_name) * lr_factor
    run_dir = Path(args.out_dir) / (f"{opt_name}-seed{seed}" if lr_factor == 1.0 else f"{opt_name}-lr{base_lr:g}-seed{seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    hidden, inter, heads, layers = MODEL_SHAPES[args.model]
    config = LlamaConfig(vocab_size=vocab_size, hidden=hidden, intermediate=inter, heads=heads, layers=layers,
                         max_seq_len=max(args.seq_len, 64))
    torch.manual_seed(seed)  # same initial weights for every optimizer at this seed
    model = Llama(config).to(device)
    opt = build_optimizer(opt_name, model, args, base_lr)
    rank_names = ranked_parameter_names(model, opt)
    start_step, batches_done = 0, 0
    ckpt_path = run_dir / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, asdict(config), opt_name)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step, batches_done = ckpt["step"], ckpt["batches_done"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if master:
            print(f"resumed {ckpt_path} at step {start_step}")
    elif args.resume and master:
        print(f"--resume: no checkpoint at {ckpt_path}, starting fresh")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if dist["ddp"]:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    use_amp = device.type == "cuda" and args.dtype in ("bfloat16", "float16")
    ctx = (torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if use_amp else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and args.dtype == "float16")

    train_iter = data.train_batches(args.batch_size, seed, args.shuffle_buffer)
    if batches_done:  # fast-forward the deterministic stream to where the checkpoint left it
        for _ in _progress(range(batches_done), "skipping data", disable=not master or args.quiet):
            next(train_iter)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = []
        for x, y in val:
            with ctx:
                losses.append(raw_model(x.to(device), y.to(device))[1].item())
        model.train()
        return sum(losses) / len(losses)

    metrics = open(run_dir / "metrics.jsonl", "a") if master else None
    if master and rank_names and start_step == 0:
        _log(metrics, step=0, rank_names=rank_names)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist["world"]
    stop_at = args.max_steps if args.stop_after is None else min(args.max_steps, start_step + args.stop_after)
    step_times, tokens_seen, loss_val, val_loss = [], 0, float("nan"), None
    t_start = last_log_t = time.perf_counter()
    last_log_tokens = 0
    bar = _progress(None, f"{opt_name} s{seed}", disable=not master or args.quiet, initial=start_step,
                    total=args.max_steps)
    step = start_step
    with _stop_on_first_ctrl_c() as stop_requested:
        while step < stop_at and not stop_requested():
            # lr ← warmup, then cosine decay to the floor
            lr = get_lr(step, base_lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                x, y = next(train_iter)
                if dist["ddp"]:  # all-reduce the gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                with ctx:
                    _, loss = model(x.to(device), y.to(device))
                    loss = loss / args.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            batches_done += args.grad_accum
            if args.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            scaler.step(opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            bar.update(1)
            if step % args.log_interval == 0 or step == stop_at:
                loss_val = float(loss_sum)
                now = time.perf_counter()
                tps = (tokens_seen - last_log_tokens) / max(now - last_log_t, 1e-9)
                last_log_t, last_log_tokens = now, tokens_seen
                if master:
                    bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    row = dict(step=step, train_loss=loss_val, lr=lr, tokens_per_s=tps)
                    if rank_names:
                        row["ranks"] = opt.ranks()
                    _log(metrics, **row)
            if step % args.eval_interval == 0 or step == args.max_steps:
                val_loss = evaluate()
                if master:
                    _log(metrics, step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    if not args.quiet:
                        bar.write(f"{opt_name} seed {seed} step {step}: val loss {val_loss:.4f}, "
                                  f"ppl {math.exp(min(val_loss, 50)):.2f}")
            if master and args.save_interval and step % args.save_interval == 0:
                _save(ckpt_path, raw_model, opt, opt_name, config, args, step, batches_done)
        interrupted = stop_requested()
    bar.close()
    if master:
        _save(ckpt_path, raw_model, opt, opt_name, config, args, step, batches_done)
        if interrupted:
            print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; rerun with --resume")
    if val_loss is None or step != args.max_steps:
        val_loss = evaluate()
    elapsed = time.perf_counter() - t_start
    result = dict(optimizer=opt_name, seed=seed, lr=base_lr, steps=step, val_loss=val_loss,
                  val_ppl=math.exp(min(val_loss, 50)), train_loss=loss_val,
                  tokens_per_s=tokens_seen / max(elapsed, 1e-9), step_ms=1e3 * _mean(step_times),
                  state_mb=la.state_bytes(opt) / 2**20, seconds=elapsed,
                  peak_cuda_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  params=sum(p.numel() for p in raw_model.parameters()))
    if device.type == "cuda" and args.peak_tflops:
        result["mfu"] = result["tokens_per_s"] * raw_model.flops_per_token(args.seq_len) / (args.peak_tflops * 1e12)
    if rank_names:
        result["ranks"] = dict(zip(rank_names, opt.ranks()))
    if master:
        _log(metrics, step=step, final=result)
        metrics.close()
    if interrupted:
        raise KeyboardInterrupt
    return result


@contextlib.contextmanager
def _stop_on_first_ctrl_c():
    """The first Ctrl-C finishes the current step and stops cleanly (with a
    checkpoint); a second one interrupts at once."""
    flag = {"stop": False}
    main_thread = threading.current_thread() is threading.main_thread()  # signals only work there
    if main_thread:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if flag["stop"]:
                raise KeyboardInterrupt
            flag["stop"] = True
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["stop"]
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def ranked_parameter_names(model: nn.Module, opt) -> list[str]:
    """Names of the parameters whose ranks ``opt.ranks()`` lists, in its order."""
    if not hasattr(opt, "ranks"):
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(opt, la.Adapprox):
        return [names[id(p)] for g in opt.param_groups for p in g["params"] if la.Adapprox.is_factored(p)]
    return [names[id(p)] for g in opt.param_groups if g.get("rank") is not None for p in g["params"]]


def _save(path, model, opt, opt_name, config, args, step, batches_done):
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "optimizer_name": opt_name,
                           "model_args": asdict(config), "step": step, "batches_done": batches_done,
                           "config": vars(args), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})


def _log(fh, **row):
    fh.write(json.dumps(row) + "\n")
    fh.flush()


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _progress(iterable, desc, disable=False, **kw):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, mininterval=1.0, **kw)


# =============================================================================
# Benchmarks: optimizer state per method, step() time per method
# =============================================================================

PUBLISHED_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}


def model_on_meta(name: str, vocab_size: int = 32000) -> Llama:
    """The model's parameter shapes without allocating them (meta device)."""
    hidden, inter, heads, layers = MODEL_SHAPES[name]
    with torch.device("meta"):
        return Llama(LlamaConfig(vocab_size=vocab_size, hidden=hidden, intermediate=inter, heads=heads, layers=layers,
                                 max_seq_len=64))


def predicted_state_bytes(model: nn.Module, method: str, rank: int, *, beta1: float = 0.9,
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
            continue
        if method == "adapprox":
            if la.Adapprox.is_factored(p):
                m, n = p.shape
                k = max(1, int(k_max_frac * min(m, n)))
                total += f * (k * (m + n) + (m * n if beta1 > 0 else 0))
            else:
                total += f * p.numel() * (2 if beta1 > 0 else 1)
            continue
        if id(p) not in lowrank:
            total += 2 * f * p.numel()  # the dense AdamW path
            continue
        s, l = min(p.shape), max(p.shape)
        r = min(rank, s)
        total += f * (2 * r * l + s * r)  # m, v: r×l ; P: s×r
        if method == "adaptive":
            total += 4  # the limiter's previous RMS
        if method == "ldadam":
            total += error_bytes * p.numel()  # error-feedback buffer
    return total


def memory_table(configs=("60m", "130m", "350m", "1b"), ranks=(None, 4, 8)) -> str:
    """Markdown: optimizer state per method (GB and % of AdamW) at several ranks."""
    rows = ["| model | rank | AdamW GB | GaLore / AdaptiveAdamW | LDAdam (fp32 EF) | LDAdam (bf16 EF) | "
            "Adapprox β1=0.9 | Adapprox β1=0 |", "|---|---|---|---|---|---|---|---|"]
    for name in configs:
        model = model_on_meta(name)
        adamw = predicted_state_bytes(model, "adamw", 1)
        for rank in ranks:
            r = PUBLISHED_RANKS.get(name, 128) if rank is None else rank
            cell = lambda b: f"{b / 1e9:.3f} ({100 * b / adamw:.1f} %)"
            rows.append(f"| {name} | {r} | {adamw / 1e9:.3f} | {cell(predicted_state_bytes(model, 'galore', r))} | "
                        f"{cell(predicted_state_bytes(model, 'ldadam', r))} | "
                        f"{cell(predicted_state_bytes(model, 'ldadam', r, error_bytes=2))} | "
                        f"{cell(predicted_state_bytes(model, 'adapprox', r))} | "
                        f"{cell(predicted_state_bytes(model, 'adapprox', r, beta1=0.0))} |")
    return "\n".join(rows)


def bench_steps(args) -> str:
    """Time ``step()`` of each optimizer on the attn/mlp matrices of ``--model``.

    Normal steps are the mean of ``--bench-steps`` steps after a warm-up; the
    refresh step is GaLore/AdaptiveAdamW's SVD step (the next one after
    them); amortized = (refresh + (T-1)·normal) / T with T = --update-proj-gap.
    """
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    hidden, inter, heads, layers = MODEL_SHAPES[args.model]
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Llama(LlamaConfig(vocab_size=320, hidden=hidden, intermediate=inter, heads=heads, layers=layers,
                                  max_seq_len=64))
    rank = args.rank if args.rank is not None else max(1, hidden // 4)
    params = la.lowrank_groups(model, rank)[-1]["params"]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n, T = args.bench_steps, args.update_proj_gap

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(opt):
        for p, g in zip(params, grads):
            p.grad = g
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0

    results = {}
    for name in args.optimizers:
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        elif name == "adapprox":
            opt = la.Adapprox(params, lr=1e-5, err_tol=args.err_tol, k_max_frac=args.k_max_frac,
                              rank_init=args.rank_init)
        else:
            group = [{"params": params, "rank": rank}]
            cls = {"galore": la.GaLoreAdamW, "adaptive": la.AdaptiveAdamW, "ldadam": la.LDAdam}[name]
            opt = cls(group, lr=1e-5, **({} if name == "ldadam" else {"update_proj_gap": n + 1}))
        timed(opt)  # step 1: allocates state (and the first SVD)
        normal = [timed(opt) for _ in range(n)]
        refresh = timed(opt) if name in ("galore", "adaptive") else None  # step n+2 = 1 + (n+1): a refresh
        normal_ms = 1e3 * statistics.median(normal)
        refresh_ms = 1e3 * refresh if refresh is not None else normal_ms
        results[name] = (normal_ms, refresh_ms, (refresh_ms + (T - 1) * normal_ms) / T)
        del opt
    base = results.get("adamw")
    lines = [f"step() on the {len(params)} attn/mlp matrices of {args.model} (rank {rank}, {device}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads); median of {n} normal steps; "
             f"amortized over T = {T}", "",
             "| optimizer | normal ms | refresh ms | amortized ms | normal / AdamW | refresh / AdamW | "
             "amortized / AdamW |", "|---|---|---|---|---|---|---|"]
    for name, (a, b, c) in results.items():
        ratios = " | ".join(f"{x / y:.2f}" for x, y in zip((a, b, c), base)) if base else " | | "
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {c:.2f} | {ratios} |")
    return "\n".join(lines)


# =============================================================================
# Plots (matplotlib, only when asked for)
# =============================================================================


def read_runs(out_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl of every run folder under out_dir: {folder name: rows}."""
    runs = {}
    for f in sorted(Path(out_dir).glob("*/metrics.jsonl")):
        runs[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return runs


def make_plots(out_dir: Path) -> list[Path]:
    """Loss curves of every run; AdaptiveAdamW's ranks as a matrices × refreshes
    heatmap; Adapprox's ranks over time. PNGs are written into out_dir."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plots need matplotlib, which is not installed: pip install matplotlib")
    runs = read_runs(out_dir)
    if not runs:
        sys.exit(f"no runs (*/metrics.jsonl) under {out_dir}")
    written = []
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for name, rows in runs.items():
        label = name.rsplit("-seed", 1)[0]
        color = colors.setdefault(label, f"C{len(colors) % 10}")
        first = label not in {line.get_label() for line in ax_v.get_lines()}
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
    written.append(out_dir / "loss_curves.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    for name, rows in runs.items():
        names = next((r["rank_names"] for r in rows if "rank_names" in r), None)
        history = [(r["step"], r["ranks"]) for r in rows if "ranks" in r]
        if not names or not history:
            continue
        short = [n.replace("layers.", "L").replace(".weight", "").replace("_proj", "") for n in names]
        if name.startswith("adaptive"):
            # one column per allocation: keep the rank vectors where they change
            cols = [history[0]] + [h for prev, h in zip(history, history[1:]) if h[1] != prev[1]]
            grid = torch.tensor([c[1] for c in cols]).T  # (matrices, refreshes)
            fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(cols) + 3), 0.25 * len(names) + 1.5))
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(short)), short, fontsize=7)
            ax.set_xticks(range(len(cols)), [str(c[0]) for c in cols], fontsize=7)
            ax.set_xlabel("logged at step (each column: a new allocation)")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    ax.text(j, i, str(int(grid[i, j])), ha="center", va="center", fontsize=6, color="w")
            fig.colorbar(im, ax=ax, label="rank")
            ax.set_title(f"AdaptiveAdamW ranks: {name}")
        elif name.startswith("adapprox"):
            fig, ax = plt.subplots(figsize=(7, 4))
            steps = [h[0] for h in history]
            for i, n in enumerate(short):
                ax.plot(steps, [h[1][i] for h in history], lw=0.8, alpha=0.5)
            ax.plot(steps, [sum(h[1]) / len(h[1]) for h in history], color="k", lw=2, label="mean")
            ax.set_xlabel("step")
            ax.set_ylabel("rank k of V ≈ Q Uᵀ")
            ax.legend()
            ax.set_title(f"Adapprox ranks: {name}")
        else:
            continue
        fig.tight_layout()
        written.append(out_dir / f"ranks_{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# =============================================================================
# Command line
# =============================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--data", default=None, help="C4 shards: a directory, a glob or a file (c4-train.*.json.gz, "
                   "c4-validation.*.json.gz, .json/.jsonl); none = the embedded Python-docs corpus")
    a.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lowrank_adam"),
                   help="where the embedded corpus is written")
    a.add_argument("--tokenizer", default=None, help="a local tokenizer.json (needs the 'tokenizers' package); "
                   "none = UTF-8 bytes")
    a.add_argument("--eos-token", default=None, help="end-of-document token of --tokenizer (default: </s> and kin)")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    a.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (per process)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--shuffle-buffer", type=int, default=1000, help="sequences in the seeded shuffle buffer")
    a.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny", choices=list(MODEL_SHAPES), help="LLaMA shape (hidden/intermediate/"
                   "heads/layers: " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in MODEL_SHAPES.items()) + ")")
    o = p.add_argument_group("optimizer")
    o.add_argument("--optimizer", default="adamw", help=f"one or a comma list of: {', '.join(OPTIMIZERS)}; "
                   "variants: adaptive:METRIC, galore+residual, adaptive+noresidual, ldadam+noef")
    o.add_argument("--lr-sweep", default="1", help="comma list of factors on each optimizer's lr (e.g. 0.5,1,2); "
                   "the summary then reports each optimizer at its best lr")
    o.add_argument("--lr", default=None, help="peak learning rate, or per optimizer: adamw=3e-3,galore=1e-2 "
                   f"(defaults: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
    o.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    o.add_argument("--beta1", type=float, default=0.9, help="Adam β1")
    o.add_argument("--beta2", type=float, default=0.999, help="Adam β2")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    o.add_argument("--rank", type=int, default=None, help="rank of the attn/mlp matrices (GaLore, LDAdam) or "
                   "average rank (AdaptiveAdamW); default hidden/4")
    o.add_argument("--update-proj-gap", type=int, default=200, help="steps between subspace refreshes (GaLore, "
                   "AdaptiveAdamW)")
    o.add_argument("--scale", type=float, default=0.25, help="GaLore scale α")
    o.add_argument("--rank-metric", default="explained_variance", choices=sorted(la.RANK_METRICS),
                   help="AdaptiveAdamW allocation metric")
    o.add_argument("--residual", default="default", choices=["default", "on", "off"], help="Fira-style "
                   "out-of-subspace residual for GaLore and AdaptiveAdamW (default: GaLore off, AdaptiveAdamW on)")
    o.add_argument("--norm-growth-limit", type=float, default=1.01, help="norm-growth limiter γ (0 = off)")
    o.add_argument("--rho", type=float, default=0.908, help="LDAdam ρ")
    o.add_argument("--ldadam-betas", type=float, nargs=2, default=None, help="LDAdam betas (default: --beta1 "
                   "--beta2; the paper's are 0.908 0.99)")
    o.add_argument("--no-error-feedback", action="store_true", help="LDAdam without error feedback")
    o.add_argument("--error-dtype", default="fp32", choices=["fp32", "bf16"], help="LDAdam error buffer dtype")
    o.add_argument("--k-max-frac", type=float, default=0.25, help="Adapprox: max rank as a fraction of min(m, n)")
    o.add_argument("--err-tol", type=float, default=0.1, help="Adapprox: relative error target of the rank rule")
    o.add_argument("--rank-init", type=int, default=None, help="Adapprox: initial rank (default: its largest)")
    o.add_argument("--clip-threshold", type=float, default=1.0, help="Adapprox update clipping d (0 = off)")
    o.add_argument("--cosine-guidance", action="store_true", help="Adapprox cosine-similarity guidance")
    s = p.add_argument_group("schedule")
    s.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    s.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps")
    s.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of the peak lr")
    s.add_argument("--eval-interval", type=int, default=100, help="steps between validation evaluations")
    s.add_argument("--log-interval", type=int, default=10, help="steps between progress/metrics updates")
    y = p.add_argument_group("system")
    y.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    y.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype on CUDA (CPU always runs float32)")
    y.add_argument("--compile", action="store_true", help="torch.compile the model")
    y.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    y.add_argument("--seed", type=int, default=0, help="seed of weights, data order and optimizer randomness")
    y.add_argument("--seeds", type=int, default=1, help="run seeds seed..seed+N-1 and report median and spread")
    y.add_argument("--out-dir", default="out", help="checkpoints and metrics.jsonl, one folder per run")
    y.add_argument("--resume", action="store_true", help="continue each run from its checkpoint in --out-dir")
    y.add_argument("--save-interval", type=int, default=0, help="also checkpoint every N steps (0 = at the end)")
    y.add_argument("--stop-after", type=int, default=None, help="stop (and checkpoint) after N steps in this "
                   "invocation, keeping the --max-steps schedule; for time-limited jobs, continue with --resume")
    y.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    y.add_argument("--quiet", action="store_true", help="no progress bars")
    b = p.add_argument_group("benchmarks (print a table and exit)")
    b.add_argument("--bench", action="store_true", help="time step() of each --optimizer on --model's attn/mlp "
                   "matrices (random gradients): normal, refresh and amortized, as ratios to AdamW")
    b.add_argument("--bench-steps", type=int, default=5, help="normal steps timed by --bench")
    b.add_argument("--plot", action="store_true", help="after the runs, write PNG plots into --out-dir "
                   "(loss curves, AdaptiveAdamW rank heatmap, Adapprox ranks; needs matplotlib)")
    b.add_argument("--plot-only", action="store_true", help="only plot the runs already in --out-dir")
    b.add_argument("--memory-table", action="store_true", help="optimizer state per method for the 60m-1b "
                   "configs at the published ranks and at ranks 4 and 8")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
    if not names:
        p.error("--optimizer: empty list")
    for n in names:
        try:
            parse_optimizer(n)
        except ValueError as e:
            p.error(f"--optimizer: {e}")
    args.optimizers = names
    try:
        args.lr_factors = [float(f) for f in args.lr_sweep.split(",")]
    except ValueError:
        p.error(f"--lr-sweep: not a comma list of numbers: {args.lr_sweep}")
    for flag in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "seeds",
                 "val_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def setup_distributed(args) -> dict:
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        import torch.distributed as tdist
        cuda = torch.cuda.is_available() and args.device != "cpu"
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world, local = tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    return dict(ddp=ddp, rank=rank, world=world, device=device, master=rank == 0)


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
            if cuda:
                row.append(f"{med(rs, 'peak_cuda_gb'):.2f}")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    if len(by_run) == len(best):
        return table(list(by_run))
    return ("all learning rates:\n" + table(list(by_run)) + "\n\neach optimizer at its best lr:\n"
            + table(list(best.values())))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_table:
        print(memory_table())
        return []
    if args.bench:
        print(bench_steps(args))
        return []
    if args.plot_only:
        for path in make_plots(Path(args.out_dir)):
            print(f"wrote {path}")
        return []
    dist = setup_distributed(args)
    tokenizer = FileTokenizer(args.tokenizer, args.eos_token) if args.tokenizer else ByteTokenizer()
    source = args.data
    if source is None:
        source = str(build_embedded_corpus(Path(os.path.expanduser(args.cache_dir))))
    try:
        data = C4Data(source, tokenizer, args.seq_len, rank=dist["rank"], world=dist["world"])
        val = data.val_batches(args.batch_size, args.val_batches)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    vocab = 64 * math.ceil(tokenizer.vocab_size / 64)  # padded for fast matmuls
    if dist["master"]:
        hidden, inter, heads, layers = MODEL_SHAPES[args.model]
        print(f"data: {source} ({len(data.train_files)} train / {len(data.val_files)} validation shards"
              f"{', holding out every 100th document for validation' if data.holdout else ''}); "
              f"tokenizer: {tokenizer.name} (vocab {tokenizer.vocab_size}, padded to {vocab})")
        print(f"model: {args.model} ({hidden}/{inter}/{heads}/{layers}); tokens per step: "
              f"{args.batch_size * args.seq_len * args.grad_accum * dist['world']:,}; device: {dist['device']}")
    results = []
    try:
        for seed in range(args.seed, args.seed + args.seeds):
            for name, factor in [(n, f) for n in args.optimizers for f in args.lr_factors]:
                r = train_one(name, seed, args, data, val, vocab, dist, factor)
                results.append(r)
                if dist["master"]:
                    extra = f", peak CUDA {r['peak_cuda_gb']:.2f} GB" if r["peak_cuda_gb"] is not None else ""
                    extra += f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
                    print(f"{name} (lr {r['lr']:g}) seed {seed}: {r['params'] / 1e6:.2f}M params, val loss {r['val_loss']:.4f}, "
                          f"val ppl {r['val_ppl']:.2f}, {r['tokens_per_s']:,.0f} tokens/s, optimizer state "
                          f"{r['state_mb']:.2f} MB, step() {r['step_ms']:.2f} ms, {r['seconds']:.0f} s{extra}")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if dist["ddp"]:
            torch.distributed.destroy_process_group()
    s = data.stats
    if dist["master"]:
        if s.bad_lines or s.no_text or s.bad_shards:
            print(f"data: skipped {s.bad_lines} undecodable lines, {s.no_text} records without text, "
                  f"{s.bad_shards} unreadable shards")
        if len(results) > 1:
            print(summarize(results))
        with open(Path(args.out_dir) / "results.json", "w") as fh:
            json.dump(results, fh, indent=1)
        if args.plot:
            for path in make_plots(Path(args.out_dir)):
                print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
