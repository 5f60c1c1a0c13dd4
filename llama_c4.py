"""What train_tiny_llama.py trains, and on what: the LLaMA model and the C4 data.

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
``build_embedded_corpus`` writes the documentation every Python ships as
C4-format shards. Data errors are ``DataError`` (or ``FileNotFoundError``),
with a message for the user.
"""

from __future__ import annotations

import ast, glob, gzip, json, os, queue, random, shutil, sys, sysconfig, threading, time, zlib  # noqa: E401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


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


# ----------------------------------------------------------------------------- the embedded corpus

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


def build_embedded_corpus(cache_dir: Path, train_shards: int = 4, announce: bool = True) -> Path:
    """Write the Python documentation as C4-format shards into ``cache_dir``, once
    (every 20th document is validation); ``announce``: first say so, and where, in a
    line on stderr (it takes some seconds). The shards are written into a temporary
    folder beside the corpus, which is renamed into place once complete: an
    interrupted run leaves no partial corpus, and concurrent writers (torchrun's
    ranks) never mix their files."""
    out = cache_dir / f"pydoc-c4-py{sys.version_info.major}{sys.version_info.minor}"
    if (out / "DONE").exists():
        return out
    if announce:
        print(f"writing the embedded corpus to {out} (once: this Python's documentation as C4 shards, about 10 s)",
              file=sys.stderr, flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{out.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    partial.mkdir()
    try:
        docs = list(python_docs())
        train = [d for i, d in enumerate(docs) if i % 20 != 9]
        shards = [("c4-validation.00000-of-00001.json.gz", docs[9::20])]
        shards += [(f"c4-train.{i:05d}-of-{train_shards:05d}.json.gz", train[i::train_shards])
                   for i in range(train_shards)]
        for name, items in shards:
            with gzip.open(partial / name, "wt", encoding="utf-8") as fh:
                for url, text in items:
                    fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T00:00:00Z", "url": url}) + "\n")
        (partial / "DONE").write_text(f"{len(docs)} documents\n")
        if out.exists() and not (out / "DONE").exists():  # left by a version that wrote the shards in place
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(partial, out)
        except OSError:  # another process renamed its complete copy into place first
            if not (out / "DONE").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (gone once renamed)
    return out
