"""What train_tiny_llama.py trains, on what, and the mechanics of a run: the LLaMA
model, the C4 data, and what the training script calls on but need not show.

The model is LLaMA as in the GaLore and LDAdam experiments (RMSNorm, rotary
embeddings, SwiGLU, untied head) in their published shapes.

The data: C4 shards -> documents -> packed token sequences -> shuffled batches.
Shards are streamed as distributed (gzip JSON lines, never a whole shard in
memory); documents are tokenized, joined with an end-of-document token and cut
into fixed-length sequences (no padding), which a seeded buffer shuffles. The
validation stream is disjoint from the training stream, and each DDP rank reads
its own slice. The loader's position is an explicit state (shard, line,
document counters, packing remainder, shuffle buffer, RNG): a checkpoint holds
it, and a resume continues at once instead of replaying the stream. Without C4,
``build_embedded_corpus`` writes the documentation every Python ships (or the
installed packages' READMEs, licences and metadata) as C4-format shards. Data
errors are ``DataError`` (or ``FileNotFoundError``), with a message for the
user; load_tokenizer and load_data load --tokenizer and --data for the script,
stopping it with that message.

The mechanics of a run, in sections: the command line (one-line errors, the
--help formatter, the checks of --device and --out-dir), terminal output (a
progress bar or plain lines; a run's result in one line), the Muon-with-AdamW
wrapper, torchrun's processes (DDP setup, FSDP2 sharding, what the ranks agree
on), the memory modes (--layerwise, --zero, --fsdp: what each refuses),
checkpoints, metrics and resuming (one process's state dicts gathered from a
sharded run, the checks of a resume's flags), and how a run stops (Ctrl-C,
divergence, a failure before the first step, and the exit status of each).
"""

from __future__ import annotations

import argparse, ast, contextlib, glob, gzip, hashlib, importlib.metadata, json, os, queue, random, re  # noqa: E401
import shutil, signal, sys, sysconfig, tempfile, textwrap, threading, time, zlib  # noqa: E401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import lowrank_adam as la


# ----------------------------------------------------------------------------- the model

# hidden / intermediate / heads / layers: the published shapes of the GaLore and
# LDAdam experiments, plus a CPU-sized default.
MODEL_SHAPES = {"tiny": (64, 176, 4, 4), "9m": (128, 352, 4, 4), "20m": (256, 688, 4, 4), "35m": (384, 1024, 8, 6),
                "60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 16, 24),
                "1b": (2048, 5461, 32, 24)}


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x²) + eps) · w, in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def apply_rotary(x, cos, sin):
    # rotate the two halves of each head: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(c.hidden, c.hidden, bias=False)
                                                              for _ in range(4))

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
        head_dim = c.hidden // c.heads  # rotary angles: position t, frequency theta^(-2i/hs)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(c.max_seq_len).float(), inv_freq)  # (T, hs/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
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
        loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                            targets.reshape(-1))
        return logits, loss

    def flops_per_token(self, seq_len: int) -> float:
        """6N for the matmuls plus attention scores (nanoGPT's / PaLM's estimate)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.layers * c.hidden * seq_len


# ----------------------------------------------------------------------------- the data: constants and errors

SHARD_PATTERNS = ("*.json.gz", "*.jsonl.gz", "*.json", "*.jsonl")
HOLDOUT_EVERY = 100  # without validation shards, every 100th document is held out


class DataError(ValueError):
    """The data (or the tokenizer) cannot give what the run needs."""


# ----------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token 256. Needs no files."""
    vocab_size, eos_id, name = 257, 256, "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class FileTokenizer:
    """A local ``tokenizer.json`` through the ``tokenizers`` package, checked as it loads."""
    def __init__(self, path: str, eos_token: Optional[str] = None):
        try:
            json.loads(Path(path).read_bytes())
        except OSError as e:
            raise DataError(f"--tokenizer {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise DataError(f"--tokenizer {path}: not a tokenizer.json (not JSON: {e})") from None
        try:
            from tokenizers import Tokenizer
            self.tok, self.name = Tokenizer.from_file(path), path
        except ImportError:
            raise DataError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
        except Exception as e:  # the package's own parse error
            raise DataError(f"--tokenizer {path}: not a tokenizer.json that 'tokenizers' can load ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        candidates = [eos_token] if eos_token else ["</s>", "<|endoftext|>", "<eos>", "[SEP]"]
        ids = [i for i in map(self.tok.token_to_id, candidates) if i is not None]
        if not ids:
            raise DataError(f"--tokenizer {path}: none of {candidates} is in its vocabulary; name one with --eos-token")
        self.eos_id = ids[0]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:  # in Rust, on every core, without the GIL
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


# ----------------------------------------------------------------------------- shards -> documents

@dataclass
class DataStats:
    """What the shards held. A line counts once, however often the data repeats."""
    documents: int = 0
    bad_lines: int = 0  # undecodable bytes or invalid JSON
    no_text: int = 0  # a JSON record without a string "text"
    bad_shards: int = 0  # unreadable / truncated files, each reported once
    lines_seen: dict = field(default_factory=dict)  # shard -> lines counted so far
    lines_read: int = 0  # every line decompressed, also those a resume skips
    warned: dict = field(default_factory=dict)  # shard -> its read error, reported once

    def report(self) -> Optional[str]:
        if self.bad_lines or self.no_text or self.bad_shards:
            return (f"data: skipped {self.bad_lines} undecodable lines, {self.no_text} records without text, "
                    f"{self.bad_shards} unreadable shards")


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


def unreadable(files: list[Path], stats: DataStats, split: str) -> Optional[str]:
    """If not one of ``files`` (the ``split`` shards) gave a line, each failing as it was opened or decompressed
    (a file that is not gzip, say), what to say: the files, their errors and what a shard must be. Else None."""
    if not files or any(f not in stats.warned or stats.lines_seen.get(f, 0) for f in files):
        return None
    errors = "; ".join(f"{f.name}: {stats.warned[f]}" for f in files[:3]) + ("; ..." if len(files) > 3 else "")
    return (f"the {split} shards cannot be read ({len(files)}: {errors}): a shard must be gzip-compressed JSON lines "
            "(.json.gz, .jsonl.gz) or plain JSON lines (.json, .jsonl), one document a line")


def read_documents(files: list[Path], stats: DataStats, pos: Optional[dict] = None) -> Iterator[str]:
    """The ``text`` of each JSON line, from ``pos`` ({"file": i, "line": j}), which
    it keeps at the line after the last text yielded. Lines before the start are
    skipped unparsed; bad lines and shards are skipped and counted, once."""
    pos = pos if pos is not None else {"file": 0, "line": 0}
    while pos["file"] < len(files):
        f, i = files[pos["file"]], -1
        try:
            with (gzip.open if f.suffix == ".gz" else open)(f, "rb") as fh:
                for i, raw in enumerate(fh):
                    stats.lines_read += 1
                    if i < pos["line"]:  # a resume: this line was used before the checkpoint
                        continue
                    pos["line"], new = i + 1, i >= stats.lines_seen.get(f, 0)
                    stats.lines_seen[f] = max(stats.lines_seen.get(f, 0), i + 1)
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except ValueError:  # JSONDecodeError and UnicodeDecodeError
                        stats.bad_lines += new
                        continue
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        stats.no_text += new
                        continue
                    stats.documents += new
                    yield text
        except (OSError, EOFError, zlib.error) as e:
            if f not in stats.warned:
                stats.warned[f] = getattr(e, "strerror", None) or str(e)
                stats.bad_shards += 1
                print(f"warning: skipping the rest of {f} after line {i + 1}: {e}", file=sys.stderr)
        pos["file"], pos["line"] = pos["file"] + 1, 0


# ----------------------------------------------------------------------------- documents -> sequences -> batches

class TokenStream:
    """Documents -> tokens + end-of-document -> chunks of seq_len + 1 tokens.

    Chunks do not overlap and nothing is padded: concatenated, they are the token
    stream itself. Document i of an epoch is used if ``keep(i)``; of those, rank r
    of ``world`` takes every world-th. ``epochs=None`` repeats forever. Its state:
    the position (epoch, shard, line, document counters) and the packing remainder.
    """
    def __init__(self, files, tokenizer, seq_len: int, *, keep=lambda i: True, rank: int = 0, world: int = 1,
                 stats: Optional[DataStats] = None, epochs: Optional[int] = None):
        self.files, self.tokenizer, self.n, self.keep = files, tokenizer, seq_len + 1, keep
        self.rank, self.world, self.epochs = rank, world, epochs
        self.stats = stats if stats is not None else DataStats()
        self.pos = dict(epoch=0, file=0, line=0, doc=0, used=0, emitted=0)
        self.tokens, self.start = [], 0  # tokens[start:]: read, not yet emitted

    def state_dict(self) -> dict:
        return {**self.pos, "tokens": self.tokens[self.start:]}

    def skipped(self) -> tuple[int, int, int]:
        return self.stats.bad_lines, self.stats.no_text, self.stats.bad_shards

    def why_empty(self, documents: int, mine: int, skipped: list[int]) -> str:
        """What the training shards held, and why it gives no sequence."""
        if why := unreadable(self.files, self.stats, "training"):
            return why
        names = ", ".join(f.name for f in self.files[:3]) + (", ..." if len(self.files) > 3 else "")
        found = f"the training shards ({len(self.files)}: {names}) hold {documents} usable documents"
        if any(skipped):
            found += (f" (skipped: {skipped[0]} undecodable or non-JSON lines, {skipped[1]} records without a "
                      f"\"text\" string, {skipped[2]} unreadable shards)")
        if documents == 0:
            return found + ": add training documents (JSON lines with a \"text\" field)"
        return (found + f"; the {mine} of them for rank {self.rank} give no sequence of {self.n} tokens: use more "
                "data or a shorter --seq-len")

    def load_state_dict(self, state: dict) -> None:
        self.pos = {k: int(state[k]) for k in self.pos}
        self.tokens, self.start = [int(t) for t in state["tokens"]], 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        p = self.pos
        while self.epochs is None or p["epoch"] < self.epochs:
            yield from self.chunks()  # what a resumed state still holds
            texts, mine, skipped_before = [], 0, self.skipped()
            for text in read_documents(self.files, self.stats, p):
                p["doc"] += 1
                if not self.keep(p["doc"] - 1):
                    continue
                p["used"] += 1
                if (p["used"] - 1) % self.world != self.rank:
                    continue
                mine += 1
                texts.append(text)
                if len(texts) == 64 or sum(map(len, texts)) > 2**20:  # tokenized together (a BPE: on every core)
                    yield from self.chunks(texts)
                    texts = []
            yield from self.chunks(texts)
            if p["emitted"] == 0 and self.epochs is None:  # repeating nothing would loop forever
                raise DataError(self.why_empty(p["doc"], mine, [b - a for a, b in zip(skipped_before,
                                                                                       self.skipped())]))
            p.update(epoch=p["epoch"] + 1, file=0, line=0, doc=0, used=0, emitted=0)
            self.tokens, self.start = [], 0  # an epoch's remainder is dropped

    def chunks(self, texts: list[str] = ()) -> Iterator[torch.Tensor]:
        """Tokenize ``texts`` onto the remainder, then emit every whole chunk."""
        for ids in self.tokenizer.encode_batch(texts) if texts else []:
            self.tokens += ids + [self.tokenizer.eos_id]
        while len(self.tokens) - self.start >= self.n:
            chunk, self.start = self.tokens[self.start:self.start + self.n], self.start + self.n
            self.pos["emitted"] += 1
            yield torch.tensor(chunk, dtype=torch.long)
        del self.tokens[:self.start]  # once per call, not per chunk: no quadratic copying
        self.start = 0


class TrainBatches:
    """The training batches of one rank: a ``TokenStream`` through a seeded
    shuffle buffer of ``size`` sequences (0 = none), as (inputs, targets).
    ``state_dict()`` is a cheap snapshot; ``saveable`` makes it tensors."""
    def __init__(self, stream: TokenStream, batch_size: int, seed: int, size: int):
        self.stream, self.batch_size, self.size = stream, batch_size, size
        self.rng, self.buffer, self.sequences = random.Random(seed), [], iter(stream)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.stack([self.next_sequence() for _ in range(self.batch_size)])  # (B, T+1)
        return b[:, :-1], b[:, 1:]

    def next_sequence(self) -> torch.Tensor:
        item = next(self.sequences)
        if self.size == 0:
            return item
        while len(self.buffer) < self.size:  # fill the buffer first
            self.buffer.append(item)
            item = next(self.sequences)
        i = self.rng.randrange(self.size)  # then take a random one out, put the new one in
        out, self.buffer[i] = self.buffer[i], item
        return out

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "buffer": list(self.buffer), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """A snapshot, or its ``saveable`` form (as read back from a checkpoint)."""
        self.stream.load_state_dict(state["stream"])
        self.buffer = list(state["buffer"]) if len(state["buffer"]) else []
        self.rng.setstate(state["rng"])
        self.sequences = iter(self.stream)


def saveable(state: dict) -> dict:
    """A ``TrainBatches`` snapshot as tensors and numbers (for torch.load(weights_only=True))."""
    stream = {**state["stream"], "tokens": torch.tensor(state["stream"]["tokens"], dtype=torch.long)}
    buffer = torch.stack(state["buffer"]) if state["buffer"] else torch.zeros(0, dtype=torch.long)
    return {"stream": stream, "buffer": buffer, "rng": state["rng"]}


def batched(seqs: Iterator[torch.Tensor], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, next-token targets) batches of ``seqs``, the last one possibly short."""
    while chunk := [s for _, s in zip(range(batch_size), seqs)]:
        b = torch.stack(chunk)  # (B, T+1)
        yield b[:, :-1], b[:, 1:]


class Prefetch:
    """Batches made ``depth`` ahead by a background thread, each with the loader
    state after it: tokenizing never holds up the training step, and ``state``
    is that of the last batch taken (what a checkpoint saves). ``wait`` is the
    time spent waiting for data."""
    def __init__(self, batches: TrainBatches, depth: int = 8):
        self.queue, self.wait, self.state = queue.Queue(maxsize=depth), 0.0, batches.state_dict()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.work, args=(batches,), daemon=True)
        self.thread.start()

    def work(self, batches: TrainBatches) -> None:
        try:
            while self.put((next(batches), batches.state_dict())):
                pass
        except BaseException as e:  # re-raised in the loop (DataError: the data ran dry)
            self.put((None, e))

    def put(self, item) -> bool:
        """Queue ``item`` once there is room; False if close() came first (nobody reads any more)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        batch, self.state = self.queue.get()
        self.wait += time.perf_counter() - t0
        if batch is None:
            raise self.state
        return batch

    def close(self) -> None:
        """Stop the worker and wait for it (a thread still in torch at exit can abort the process)."""
        self.stop.set()
        self.thread.join()


# ----------------------------------------------------------------------------- one data source

class C4Data:
    """Train and validation streams of one data source, disjoint by construction."""
    def __init__(self, spec: str, tokenizer, seq_len: int, rank: int = 0, world: int = 1):
        self.train_files, self.val_files = find_shards(spec)
        self.tokenizer, self.seq_len, self.rank, self.world = tokenizer, seq_len, rank, world
        self.holdout = not self.val_files  # no validation shards: hold out every 100th train document
        if not self.train_files:  # only validation shards were given
            self.train_files, self.val_files, self.holdout = self.val_files, [], True
        self.stats = DataStats()

    def held_out(self, i: int) -> bool:
        return self.holdout and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1

    def train_batches(self, batch_size: int, seed: int, shuffle_buffer: int) -> TrainBatches:
        stream = TokenStream(self.train_files, self.tokenizer, self.seq_len, keep=lambda i: not self.held_out(i),
                             rank=self.rank, world=self.world, stats=self.stats)
        return TrainBatches(stream, batch_size, seed, shuffle_buffer)

    def val_batches(self, batch_size: int, count: int) -> list:
        """The first ``count`` validation batches, the same on every rank."""
        files, keep = (self.train_files, self.held_out) if self.holdout else (self.val_files, lambda i: True)
        seqs = TokenStream(files, self.tokenizer, self.seq_len, keep=keep, stats=self.stats, epochs=1)
        out = [b for _, b in zip(range(count), batched(iter(seqs), batch_size))]
        if not out and (why := unreadable(files, self.stats, "training" if self.holdout else "validation")):
            raise DataError(why)
        if not out and self.holdout:
            raise DataError(f"the held-out validation set is empty: with no c4-validation.* shard every "
                            f"{HOLDOUT_EVERY}th document is held out, and {self.stats.documents} documents give no "
                            f"held-out sequence of {self.seq_len + 1} tokens; add a validation shard or more documents")
        if not out:
            raise DataError(f"the validation shards give no sequence of {self.seq_len + 1} tokens: use a shorter "
                            "--seq-len")
        return out


# ----------------------------------------------------------------------------- the embedded corpora
# Two kinds of text that need no download, picked by --corpus: "pydoc", the documentation every
# Python ships, and "packages", the installed packages' READMEs, licences and metadata.

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


def installed_distributions(path: Optional[list[str]] = None) -> list[tuple[str, importlib.metadata.Distribution]]:
    """(name, distribution) of every installed Python package (on ``path``, unset: sys.path), one per
    normalized name (the first found, as import finds it), sorted by that name. Reads metadata only."""
    found = {}
    for dist in importlib.metadata.distributions(**({} if path is None else {"path": path})):
        meta = dist.metadata  # (None on some Pythons where the METADATA file is missing)
        name = meta["Name"] if meta is not None else None
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist)
    return sorted(found.items())


# files of a distribution that hold prose: LICENSE, COPYING, NOTICE, README, CHANGELOG (and LICENSE.MIT,
# README.md, ...), but not code or markup of that name (license.py, readme.html)
PROSE_FILE = re.compile(r"(?i)(LICEN[CS]ES?|COPYING|NOTICE|README|CHANGELOG|CHANGES)([-_.][\w.-]*)?")
NOT_PROSE = {".py", ".pyc", ".pyi", ".pyx", ".pxd", ".so", ".pyd", ".dll", ".dylib", ".c", ".h", ".cpp", ".js",
             ".json", ".html", ".htm", ".css", ".xml", ".png", ".svg", ".jpg", ".gif"}
MIN_DOCUMENT = 200  # characters: shorter texts (a one-line description, a stub README) are left out


def package_docs(dists: Optional[list] = None) -> Iterator[tuple[str, str]]:
    """(url, text) of the installed packages' prose: for each distribution of
    ``installed_distributions()`` (or ``dists``), in name order, its METADATA long
    description (the README that follows the headers), then its LICENSE, COPYING,
    NOTICE, README and CHANGELOG files listed in its RECORD, in path order. Texts
    under MIN_DOCUMENT characters, and any text seen before (many packages ship the
    same licence), are left out. Nothing is imported."""
    seen = set()
    for name, dist in installed_distributions() if dists is None else dists:
        meta = dist.metadata
        texts = [(f"python://packages/{name}/METADATA", meta.get_payload() or meta.get("Description") or "")]
        for file in sorted(dist.files or [], key=str):
            if PROSE_FILE.fullmatch(file.name) and Path(file.name).suffix.lower() not in NOT_PROSE:
                try:
                    texts.append((f"python://packages/{name}/{file.as_posix()}", file.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError):  # missing, unreadable or not UTF-8 text
                    continue
        for url, text in texts:
            key = text.strip()
            if len(key) >= MIN_DOCUMENT and key not in seen:
                seen.add(key)
                yield url, text


CORPORA = {"pydoc": "this Python's documentation",
           "packages": "the installed packages' READMEs, licences and metadata"}


def corpus_source(corpus: str) -> tuple[str, Callable[[], Iterator[tuple[str, str]]], str]:
    """(folder name, documents, how long a first write takes) of an embedded corpus. The
    packages corpus is named after the installed distributions, so that another set rebuilds it."""
    if corpus == "pydoc":
        return f"pydoc-c4-py{sys.version_info.major}{sys.version_info.minor}", lambda: python_docs(), "about 10 s"
    if corpus == "packages":
        dists = installed_distributions()
        listed = "\n".join(f"{name}=={dist.metadata['Version']}" for name, dist in dists)
        return (f"packages-c4-{hashlib.sha256(listed.encode()).hexdigest()[:12]}", lambda: package_docs(dists),
                "some seconds")
    raise ValueError(f"no embedded corpus {corpus!r}: {', '.join(CORPORA)}")


def build_embedded_corpus(cache_dir: Path, train_shards: int = 4, announce: bool = True,
                          corpus: str = "pydoc") -> Path:
    """Write an embedded corpus (CORPORA: the Python documentation, or the
    installed packages' prose) as C4-format shards into its own folder of
    ``cache_dir``, once (every 20th document is validation); ``announce``: first
    say so, and where, in a line on stderr (it takes some seconds), then what it
    wrote. The shards are written into a temporary folder beside the corpus,
    which is renamed into place once complete: an interrupted run leaves no
    partial corpus, and concurrent writers (torchrun's ranks) never mix their files."""
    name, documents, takes = corpus_source(corpus)
    out = cache_dir / name
    if (out / "DONE").exists():
        return out
    if announce:
        print(f"writing the embedded corpus to {out} (once: {CORPORA[corpus]} as C4 shards, {takes})",
              file=sys.stderr, flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{out.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    partial.mkdir()
    try:
        docs = list(documents())
        train = [d for i, d in enumerate(docs) if i % 20 != 9]
        shards = [("c4-validation.00000-of-00001.json.gz", docs[9::20])]
        shards += [(f"c4-train.{i:05d}-of-{train_shards:05d}.json.gz", train[i::train_shards])
                   for i in range(train_shards)]
        for shard, items in shards:
            with gzip.open(partial / shard, "wt", encoding="utf-8") as fh:
                for url, text in items:
                    fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T00:00:00Z", "url": url}) + "\n")
        (partial / "DONE").write_text(f"{len(docs)} documents\n")
        if out.exists() and not (out / "DONE").exists():  # an incomplete corpus written in place: replace it
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(partial, out)
        except OSError:  # another process renamed its complete copy into place first
            if not (out / "DONE").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (gone once renamed)
    if announce:
        size = lambda items: sum(len(text.encode("utf-8")) for _, text in items) / 1e6
        print(f"wrote the {corpus} corpus: {len(docs)} documents, {size(docs):.2f} MB of text ({len(train)} train "
              f"documents, {size(train):.2f} MB; {len(docs) - len(train)} validation)", file=sys.stderr, flush=True)
    return out


def corpus_name(args) -> str:
    """What a run trains on, for a table's caption: --data's path, or the embedded corpus."""
    return f"--data {args.data}" if args.data else f"the {args.corpus} corpus ({CORPORA[args.corpus]})"


# ----------------------------------------------------------------------------- the script's data
# --tokenizer and --data as train_tiny_llama.py loads them: a bad file or folder stops it with one line.

def load_tokenizer(args):
    """UTF-8 bytes, or --tokenizer's file (checked as it loads)."""
    try:
        return FileTokenizer(args.tokenizer, args.eos_token) if args.tokenizer else ByteTokenizer()
    except DataError as e:
        fail(str(e))


def data_source(args, announce: bool = True) -> str:
    """--data, or the embedded corpus of --corpus (written into --cache-dir by its first run)."""
    return args.data or str(build_embedded_corpus(Path(args.cache_dir).expanduser(), announce=announce,
                                                  corpus=args.corpus))


def load_data(args, tokenizer, dist: Dist) -> tuple[C4Data, list]:
    """--data (or the embedded corpus) and the validation batches, which every evaluation reuses.
    Rank 0 says what the run trains on, and how: the data, the model, the optimizer, the device."""
    source = data_source(args, announce=dist.master)
    try:
        data = C4Data(source, tokenizer, args.seq_len, rank=dist.rank, world=dist.world)
        val = data.val_batches(args.batch_size, args.val_batches)
    except (FileNotFoundError, DataError) as e:
        fail(str(e))
    if dist.master:
        print(f"data: {source} ({len(data.train_files)} train / {len(data.val_files)} validation shards"
              f"{', every 100th document held out for validation' if data.holdout else ''}); tokenizer: "
              f"{tokenizer.name} (vocab {tokenizer.vocab_size})")
        print(f"model: {args.model} ({'/'.join(map(str, MODEL_SHAPES[args.model]))}); optimizer: {args.optimizer}, "
              f"lr {args.lr:g}; tokens per step: {args.batch_size * args.seq_len * args.grad_accum * dist.world:,}; "
              f"device: {dist.device}, CPU threads: {torch.get_num_threads()}")
    return data, val


# ============================================================================= the mechanics of a run
# What train_tiny_llama.py (and bench.py) need to run but a reader of its training loop need not
# see: the command line's errors and help, terminal output, the Muon wrapper, torchrun's processes,
# the memory modes, checkpoints and resuming, and the ways a run stops.

# ----------------------------------------------------------------------------- the command line
# Every error is one line on stderr (exit status 1); --help wraps without breaking a word and shows a
# flag's default once. check_device and check_out_dir: the checks of --device and --out-dir.

def fail(message: str):
    """Stop with one line on stderr (exit status 1)."""
    raise SystemExit(f"error: {message}")


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag stops the script with one line, as every error does."""
    def error(self, message):  # one line, not argparse's usage block
        fail(f"{message} (see --help)")


class HelpWrapper(textwrap.TextWrapper):
    """Wraps at spaces and after the '|' of NAME[:a|b|c], never inside a word."""
    wordsep_simple_re = re.compile(r"(\s+|(?<=\|)(?=\S))")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; a flag shows its default once (switches and unset flags: none)."""
    def _split_lines(self, text, width):
        return HelpWrapper(width, break_long_words=False, break_on_hyphens=False).wrap(" ".join(text.split()))

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        return action.help if unset else action.help + " (default: %(default)s)"


def check_device(spec: str) -> None:
    """--device must name a CPU or a CUDA device this torch can see."""
    try:
        device = torch.device("cpu" if spec == "auto" else spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device {spec}: not a device this script runs on (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        why = "a CPU-only build" if torch.version.cuda is None else f"{torch.cuda.device_count()} GPUs visible"
        fail(f"--device {spec}: no such CUDA device (torch {torch.__version__}, {why}); use --device cpu")


def check_out_dir(args) -> None:
    """A run already in --out-dir is only continued (--resume); the folder must be writable."""
    out = Path(args.out_dir)
    found = [name for name in ("ckpt.pt", "metrics.jsonl") if (out / name).exists()]
    if found and not args.resume:
        fail(f"--out-dir {out} already holds a run ({', '.join(found)}): add --resume to continue it, or choose "
             "another --out-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a file can be written there
    except OSError as e:
        fail(f"--out-dir {out}: cannot write there ({e.strerror or e})")


# ----------------------------------------------------------------------------- terminal output
# A progress bar on a terminal, plain lines anywhere else; say() prints a line above any bar, and
# describe() a run's result in one line.

def interactive() -> bool:
    """How progress is shown, in train_tiny_llama.py and bench.py: a tqdm bar (with elapsed time and ETA)
    when stdout and stderr are both a terminal; otherwise (a pipe, a log file, pytest's capture) plain
    lines, with no carriage return. The one place this rule is decided. (A terminal of width 0, which
    some containers report, counts as none: tqdm would draw nothing there.)"""
    try:
        return (sys.stdout.isatty() and sys.stderr.isatty()
                and os.get_terminal_size(sys.stderr.fileno()).columns > 0)
    except (AttributeError, ValueError, OSError):  # no stream (pythonw), a closed one, one without a file
        return False


def say(message: str, file=None) -> None:
    """A line on stdout (or ``file``). On a terminal through tqdm.write, which writes it above
    every progress bar shown, train_tiny_llama.py's or bench.py's, and redraws them."""
    if interactive():
        tqdm.write(message, file=file or sys.stdout)
    else:
        print(message, file=file or sys.stdout, flush=True)


def progress_bar(total: int, initial: int, show: bool) -> Optional[tqdm]:
    """A bar over the steps, to ``total`` (--max-steps), with elapsed time and ETA, if ``show`` (rank 0,
    without --quiet) and on a terminal (see interactive); train_tiny_llama's log_train puts the loss, lr
    and tokens/s in its postfix. Otherwise None: plain lines. Kept when it ends, unless nested under
    another bar (bench.py compare's runs)."""
    if not (show and interactive()):
        return None
    return tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True, leave=None,
                file=sys.stderr)


def describe(r: dict) -> str:
    """A run's result (train_tiny_llama's result_of) in one line, as the script and bench.py print it."""
    extra = f", peak CUDA {r['peak_cuda_gb']:.2f} GB" if r["peak_cuda_gb"] is not None else ""
    extra += f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    if "state_bytes_per_rank" in r:
        extra += f", state bytes per rank {' / '.join(f'{b:,}' for b in r['state_bytes_per_rank'])}"
    return (f"{r['optimizer']} (lr {r['lr']:g}) seed {r['seed']}: {r['params'] / 1e6:.2f}M params, {r['steps']} steps, "
            f"val loss {r['val_loss']:.4f}, val ppl {r['val_ppl']:.2f}, {r['tokens_per_s']:,.0f} tokens/s, optimizer "
            f"state {r['state_mb']:.2f} MiB, step() {r['step_ms']:.2f} ms, {r['seconds']:.0f} s{extra}")


# ----------------------------------------------------------------------------- Muon with AdamW
# torch's Muon steps matrices only: the script's --optimizer muon is this wrapper, one optimizer.

class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon (Newton-Schulz orthogonalized momentum, one buffer per
    matrix) for the matrices of the groups with a ``rank`` (lowrank_groups'
    attn/mlp selection; the rank itself is not used), torch.optim.AdamW for the
    rest, as Muon is meant to be used: one optimizer to the script, its
    schedulers and checkpoints. Both inner optimizers work on this one's
    param-group dicts and state, so the script's schedule reaches both and
    ``state_dict()`` is the ordinary one. One ``lr`` serves both: Muon scales
    its step per matrix to AdamW's update RMS (``adjust_lr_fn=
    "match_rms_adamw"``, as in Moonlight), which is what makes that work."""

    def __init__(self, params, lr: float = 3e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999)):
        groups = [{**g, "muon": g.get("rank") is not None} for g in params]
        for g in groups:
            g.pop("rank", None)
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        self.muon = torch.optim.Muon([g for g in self.param_groups if g["muon"]] or [{"params": []}], lr=lr,
                                     weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([g for g in self.param_groups if not g["muon"]] or [{"params": []}],
                                       lr=lr, weight_decay=weight_decay, betas=betas)
        self._link()

    def _link(self) -> None:  # the inner optimizers use this one's groups and state
        for inner, muon in ((self.muon, True), (self.adamw, False)):
            inner.param_groups = [g for g in self.param_groups if g["muon"] == muon]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


# ----------------------------------------------------------------------------- torchrun's processes
# Under torchrun (DDP, --zero, --fsdp) every rank runs the script; rank 0 logs and saves. Here: the
# process group, CPU threads, FSDP2 sharding, and what the ranks must agree on or exchange.

class Dist(NamedTuple):
    """This process's place in the run: launched by torchrun or not, its rank, the number of ranks, its device."""
    ddp: bool
    rank: int
    world: int
    device: str

    @property
    def master(self) -> bool:  # rank 0 logs and saves
        return self.rank == 0


def setup_distributed(args) -> Dist:
    """torchrun sets RANK: one process per GPU with NCCL, or per CPU share with gloo. Sets the threads too."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        dist = Dist(ddp=False, rank=0, world=1, device=device)
    else:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
        dist = Dist(ddp=True, rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                    device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(dist.device)
    set_threads(args, dist.device)
    return dist


def set_threads(args, device: str) -> None:
    """--threads, or 1 for the tiny model on CPU. Measured on a 2-core machine: idle,
    2 threads ran the default run 1.25x faster; with another process busy on one
    core, 6x slower (their OpenMP threads spin, waiting for the busy core)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device == "cpu" and args.model == "tiny":
        torch.set_num_threads(1)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a timing must measure the work, not its queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_model(model: Llama) -> None:
    """--fsdp: FSDP2 (torch's fully_shard) on each block, on the embedding and on the LM head, then on the
    root (the final norm), as torchtitan does: a unit's weights are gathered for its forward and backward
    only, and its gradients reduce-scattered as soon as its backward ends. The embedding and the head are
    units of their own because at a 32k vocabulary they hold over half the weights: in the root they would
    be gathered whole, with their gradients, for the whole forward and backward. (The head is resharded
    after its forward too, costing one more all-gather per step: kept gathered, it would stay so after
    an evaluation's forward, which has no backward to reshard it.) Every weight becomes a DTensor split by
    rows; the names stay, so lowrank_groups still selects the attn/mlp matrices."""
    from torch.distributed.fsdp import fully_shard
    for block in model.layers:
        fully_shard(block)
    fully_shard(model.embed_tokens)
    fully_shard(model.lm_head)
    fully_shard(model)


def agree(stop: bool, dist: Dist) -> bool:
    """Under DDP every rank stops at the same step if any was asked to (Ctrl-C, a divergence)."""
    if not dist.ddp:
        return stop
    flag = torch.tensor([float(stop)], device=dist.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def gather(obj, dist: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    every = [None] * dist.world
    torch.distributed.all_gather_object(every, obj)
    return every


@torch.no_grad()
def check_replicas(model: nn.Module, dist: Dist) -> None:
    """Under DDP every rank must hold the same weights: compare a checksum of
    each parameter across ranks (an error names the first that differs)."""
    params = list(model.named_parameters())
    local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for _, p in params])
    every = [torch.empty_like(local) for _ in range(dist.world)]
    torch.distributed.all_gather(every, local)
    for rank, other in enumerate(every):
        differ = (other != every[0]).any(dim=1).nonzero()
        if len(differ):
            raise RuntimeError(f"DDP replicas differ: rank {rank}'s {params[differ[0, 0]][0]} is not rank 0's")
    if dist.master:
        say(f"replicas: the weights are identical on all {dist.world} ranks")


# ----------------------------------------------------------------------------- the memory modes
# --layerwise (each parameter stepped inside backward), --zero (ZeRO-1) and --fsdp (FSDP2) each work
# with some optimizers and settings only: what they refuse, and why, checked with the other flags.

# The optimizers --fsdp refuses, and why: torch's own that fail on sharded (DTensor) weights (tried with
# torch 2.13; AdamW and Muon step DTensors, Muon gathering each matrix for its Newton-Schulz iterations).
FSDP_UNSUPPORTED = {torch.optim.Adafactor: "torch's Adafactor fails on sharded weights (its row norms are "
                                           "partial DTensors, which it squares in place)"}


def check_memory_modes(args, cls: type) -> None:
    """--layerwise, --zero and --fsdp with --optimizer's class ``cls``: refuse what they cannot do,
    naming the way out."""
    torchrun = "RANK" in os.environ
    fsdp_refusals = [(not torchrun, "it shards the model across torchrun's processes: start the run with torchrun"),
                     (args.zero, "FSDP2 already shards the optimizer state: use --fsdp or --zero, not both"),
                     (args.layerwise, "lowrank_adam steps a sharded matrix whole on its owner rank, never one "
                                      "parameter inside backward: drop --layerwise (--fsdp saves more memory)"),
                     (args.dtype == "float16" and args.device != "cpu", "a GradScaler would find an inf on one "
                      "rank's shard only and skip the step there alone: use --dtype bfloat16"),
                     *((cls is c, f"{why}; run it without --fsdp (plain DDP or --zero), or use adamw, galore, "
                       "adaptive, ldadam or adapprox") for c, why in FSDP_UNSUPPORTED.items())]
    why = next((why for refused, why in fsdp_refusals if refused), None)
    if args.fsdp and why:
        fail(f"--fsdp: {why}")
    if args.zero and cls is MuonWithAdamW:
        fail("--zero: muon is two torch optimizers in one, which ZeroRedundancyOptimizer cannot shard; "
             "run it without --zero (plain DDP)")
    if args.zero and (not torchrun or args.layerwise):
        fail("--zero shards the optimizer state across torchrun's processes: start the run with torchrun, "
             "without --layerwise")
    refusals = [(args.grad_clip > 0, "no global gradient norm ever exists to clip: add --grad-clip 0"),
                (args.grad_accum > 1, "a parameter is updated at every backward, so micro-batches cannot accumulate: "
                                      "use --grad-accum 1"),
                (torchrun, "the update would come before DDP averages the gradients: run one process (under "
                           "torchrun, --zero saves memory)"),
                (args.dtype == "float16" and args.device != "cpu", "a GradScaler's inf check needs every gradient "
                                                                   "at once: use --dtype bfloat16"),
                (cls is la.AdaptiveAdamW, "adaptive allocates its rank budget from all spectra at once: use galore"),
                (cls is torch.optim.Adafactor, "torch's Adafactor cannot step one parameter at a time"),
                (cls is MuonWithAdamW, "torch's Muon cannot step one parameter at a time")]
    why = next((why for refused, why in refusals if refused), None)
    if args.layerwise and why:
        fail(f"--layerwise: {why}")


# ----------------------------------------------------------------------------- checkpoints, metrics and resuming
# A checkpoint is one process's state dicts, whatever the run's layout (DDP, --zero, --fsdp), written by
# rank 0, as is metrics.jsonl. A resume continues the run with the flags it was made with: it may change
# only how it runs, and where.

# The flags a resume may change: where and how fast it runs, how often it reports.
# The others shape the run (model, data, optimizer, schedule, seed; --max-steps too,
# as the cosine schedule is laid out over it), so a resume that changes one is refused.
RESUME_MAY_CHANGE = ("resume", "out_dir", "stop_after", "save_interval", "eval_interval", "log_interval", "quiet",
                     "device", "compile", "threads", "peak_tflops", "cache_dir")


def run_settings(args) -> dict:
    """How the run was made: every flag, and the number of processes."""
    return {**vars(args), "processes": int(os.environ.get("WORLD_SIZE", 1))}


def read_checkpoint(argv) -> Optional[dict]:
    """With --resume, the checkpoint in --out-dir (None if there is none, which main refuses): its
    settings become the defaults of the flags, so `--resume --out-dir X` alone continues X."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--out-dir", default="out")
    known, _ = pre.parse_known_args(argv)
    path = Path(known.out_dir) / "ckpt.pt"
    if not known.resume or not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, foreign pickle...
        fail(f"checkpoint {path} is corrupt or not a checkpoint of this script ({type(e).__name__}: {e}); "
             "delete it or choose another --out-dir")
    if not isinstance(ckpt, dict) or "settings" not in ckpt:
        fail(f"checkpoint {path} is not a checkpoint of this script")
    return ckpt


def check_resume(args, ckpt: Optional[dict]) -> None:
    """A resume continues the run as it was made: a flag given now that differs is refused."""
    if ckpt is None:
        return
    saved, now = ckpt["settings"], run_settings(args)
    flag = lambda k: "processes" if k == "processes" else "--" + k.replace("_", "-")
    resharded = saved.get("fsdp") and now.get("fsdp")  # an --fsdp run moves to another number of processes
    changed = [f"{flag(k)} {saved[k]} (now {now[k]})" for k in saved if k in now and k not in RESUME_MAY_CHANGE
               and saved[k] != now[k] and not (k == "processes" and resharded)]
    if changed:
        fail(f"--resume: {Path(args.out_dir) / 'ckpt.pt'} was made with other settings: {', '.join(changed)}. A "
             f"resume may only change {', '.join(flag(k) for k in RESUME_MAY_CHANGE[2:])} (and, with --fsdp, the "
             "number of processes); start anything else in a new --out-dir")


def nothing_to_resume(out: Path) -> str:
    """Why --resume refuses a folder without a checkpoint (a mistyped --out-dir must not start a new run)."""
    if (out / "metrics.jsonl").exists():
        return (f"--resume: no checkpoint in {out}: nothing to continue (its metrics.jsonl is of a run that saved "
                "none); delete that file or choose another --out-dir to start a new run")
    if (out / "metrics.diverged.jsonl").exists():
        return (f"--resume: no checkpoint in {out}: the run there diverged (see its metrics.diverged.jsonl); start "
                "a new run there without --resume, with a lower --lr")
    return (f"--resume: no checkpoint in {out}: nothing to continue; check --out-dir, or start a new run without "
            "--resume")


def resume_checkpoint(args) -> Optional[dict]:
    """read_checkpoint and check_resume for flags already parsed (bench.py compare's runs)."""
    ckpt = read_checkpoint(["--resume", "--out-dir", args.out_dir] if args.resume else [])
    check_resume(args, ckpt)
    return ckpt


def continue_command(args) -> str:
    """The command that continues the run in --out-dir."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    start = f"torchrun --standalone --nproc_per_node {world} " if world > 1 else "python "
    return f"{start}train_tiny_llama.py --resume --out-dir {args.out_dir}"


def open_metrics(path: Path, step: int, master: bool):
    """metrics.jsonl, written by rank 0: a JSON object per line, each with its step.
    A resumed run first drops the rows after its checkpoint: each step appears once."""
    if not master:
        return None
    rows = path.read_text().splitlines() if step > 0 and path.exists() else []
    path.write_text("".join(r + "\n" for r in rows if r.strip() and json.loads(r)["step"] <= step))
    return open(path, "a")


def log(metrics, **row) -> None:
    """One row of metrics.jsonl (``metrics``: None on the other ranks, which log nothing)."""
    if metrics is not None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()


def full_state(model: nn.Module, opt, dist: Dist, fsdp: bool, zero: bool) -> tuple[Optional[dict], Optional[dict]]:
    """The model's and the optimizer's state dicts as one process's, for rank 0 to save (the optimizer's:
    None on the other ranks). Every rank calls it: under --zero each sends its shard of the optimizer
    state to rank 0; under --fsdp, its shards of everything (fsdp_full_state)."""
    if fsdp:
        return fsdp_full_state(model, opt, dist)
    if zero:
        opt.consolidate_state_dict(to=0)
    return model.state_dict(), opt.state_dict() if dist.master else None


def load_full_state(model: nn.Module, opt, model_state: dict, optimizer_state: dict, dist: Dist,
                    fsdp: bool) -> None:
    """The inverse of full_state, on every rank (--zero: each keeps its shard of the optimizer state)."""
    if fsdp:
        load_fsdp_full_state(model, opt, model_state, optimizer_state, dist)
    else:
        model.load_state_dict(model_state)
        opt.load_state_dict(optimizer_state)


FULL = dict(full_state_dict=True)  # torch.distributed.checkpoint's StateDictOptions: whole tensors, no DTensors


def fsdp_full_state(model: nn.Module, opt, dist: Dist) -> tuple[Optional[dict], Optional[dict]]:
    """--fsdp: the model's and the optimizer's state dicts as one process's, on rank 0 (None elsewhere),
    keyed by parameter name: torch.distributed.checkpoint's full state dicts, on the CPU. Torch gathers
    every DTensor (weights, dense moments), and lowrank_adam each matrix's low-rank state from its owner
    rank, so the checkpoint fits any number of ranks."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(**FULL, cpu_offload=True)  # rank 0 alone keeps them, on the CPU
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, opt, options=options)
    return (model_state, optimizer_state) if dist.master else (None, None)


def load_fsdp_full_state(model: nn.Module, opt, model_state: dict, optimizer_state: dict, dist: Dist) -> None:
    """--fsdp: the inverse of fsdp_full_state, on every rank from the whole checkpoint, on any number of
    ranks: each keeps its rows of every DTensor and the states of the matrices it owns now."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, model_state, options=StateDictOptions(**FULL))
    optimizer_state = {k: v for k, v in optimizer_state.items() if k != "owners"}  # (older checkpoints kept owners)
    set_optimizer_state_dict(model, opt, optimizer_state, options=StateDictOptions(**FULL))


def resumed_data(saved, rank: int, world: int) -> dict:
    """This rank's data position from a checkpoint's (one process's, or a list of every rank's). On as
    many ranks, its own. On another number of ranks (--fsdp), every rank goes on from the furthest point
    any rank's stream had reached, with its shuffle state from rank ``rank`` mod N's and nothing carried
    over: the sequences read but not yet trained on (the shuffle buffers, the packing remainders) are
    dropped, and the documents are dealt to the ranks anew."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world:
        return states[rank]
    far = max(states, key=lambda s: tuple(int(s["stream"][k]) for k in ("epoch", "file", "line")))
    return {"stream": {**far["stream"], "tokens": torch.zeros(0, dtype=torch.long)},
            "buffer": torch.zeros(0, dtype=torch.long), "rng": states[rank % len(states)]["rng"]}


def resharded(was: int, world: int, tokens_per_step: int) -> str:
    """What a --fsdp resume on another number of processes says."""
    return (f"--fsdp: resumed on {world} processes, the checkpoint's run had {was}: each matrix's optimizer state "
            f"moves to its owner among the {world} ranks; tokens per step go from {tokens_per_step // world * was:,} "
            f"to {tokens_per_step:,}; the data goes on from the furthest rank's position (the sequences read but not "
            "yet trained on are dropped)")


# ----------------------------------------------------------------------------- how a run stops
# The first Ctrl-C stops at the end of a step with a checkpoint (Stopped), a second at once; a diverged
# run (Diverged) saves nothing and sets its files aside; a run that fails before training leaves nothing.

class Stopped(KeyboardInterrupt):
    """The first Ctrl-C: the run stopped cleanly at a step, with a checkpoint."""


class Diverged(Exception):
    """A non-finite loss or gradient at step ``step``: the run stopped there, saving nothing."""
    def __init__(self, step: int, message: str = ""):
        super().__init__(message or f"diverged at step {step}")
        self.step = step


@contextlib.contextmanager
def stop_on_first_ctrl_c():
    """The first Ctrl-C finishes the current step and stops cleanly (with a
    checkpoint); a second one interrupts at once. Yields: whether one came."""
    stop, main_thread = threading.Event(), threading.current_thread() is threading.main_thread()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
    previous = signal.signal(signal.SIGINT, handler) if main_thread else None  # signals reach the main thread only
    try:
        yield stop.is_set
    finally:
        if main_thread:  # (None: a handler not set from Python, such as an embedding program's)
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def set_aside_diverged_run(args, step: int) -> str:
    """A diverged run leaves no run in --out-dir: its metrics.jsonl, and a checkpoint saved before (which
    would diverge again, and a resume may not lower --lr), are renamed *.diverged.*, replacing those of an
    earlier divergence, so that the same command with a lower --lr starts there anew. Returns the message."""
    out, kept = Path(args.out_dir), []
    for name, aside in (("metrics.jsonl", "metrics.diverged.jsonl"), ("ckpt.pt", "ckpt.diverged.pt")):
        if (out / name).exists():
            os.replace(out / name, out / aside)
            kept.append(str(out / aside))
    what = ("this run's log is kept as " + kept[0] if len(kept) == 1 else
            f"this run's log and last checkpoint are kept as {' and '.join(kept)}" if kept else "nothing was kept")
    return (f"diverged at step {step} of {args.max_steps} (a non-finite loss or gradient): lower --lr; {what}, "
            "and the folder is free for a new run")


def stopped_at_once(args) -> str:
    """What a second Ctrl-C (or one before the first step) leaves: the last checkpoint saved, if any."""
    kept = Path(args.out_dir) / "ckpt.pt"
    if kept.exists():
        return (f"stopped at once: {kept} holds the last checkpoint saved (by --save-interval or an earlier run); "
                f"continue with: {continue_command(args)}")
    return "stopped at once: no checkpoint was saved, so nothing of this run was kept"


@contextlib.contextmanager
def handle_exits(args, dist: Dist, out_existed: bool):
    """How an invocation that trains ends, on every rank. The first Ctrl-C (Stopped: a checkpoint was
    saved and the way to continue printed) and a second one (or one before the first step) exit with
    status 130; a divergence (rank 0 says what it set aside) and the training data running dry, with 1
    and one line. A failure before the first step removes what the run wrote (remove_untrained_run),
    whatever the failure; ``out_existed``: whether --out-dir was there before. Under torchrun the
    process group is destroyed here."""
    try:
        yield
    except Stopped:
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the loop): stop at once
        remove_untrained_run(args, out_existed, dist)
        if dist.master:
            print(stopped_at_once(args), file=sys.stderr)
        sys.exit(130)
    except DataError as e:  # the training stream ran dry
        remove_untrained_run(args, out_existed, dist)
        fail(str(e))
    except Diverged as e:  # rank 0 says what it set aside
        if dist.master:
            fail(str(e))
        sys.exit(1)
    except BaseException:
        remove_untrained_run(args, out_existed, dist)
        raise
    finally:
        if dist.ddp:
            torch.distributed.destroy_process_group()


def remove_untrained_run(args, out_existed: bool, dist: Dist) -> None:
    """A run that failed before its first step leaves nothing behind: its metrics.jsonl
    (which holds only the step-0 row) goes, and --out-dir too if this run created it
    and it is empty, so that the same command works again once the cause is fixed."""
    out, metrics = Path(args.out_dir), Path(args.out_dir) / "metrics.jsonl"
    if not dist.master or (out / "ckpt.pt").exists():
        return
    if metrics.exists() and all(json.loads(r)["step"] == 0 for r in metrics.read_text().splitlines() if r.strip()):
        metrics.unlink()
    if not out_existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
