"""Training data: a byte-level text corpus, stateless random batches, and two synthetic tasks.

**Why bytes.** Every corpus here is read as raw UTF-8 bytes, and each byte is a token (a
vocabulary of 256). Nothing has to be downloaded or trained to tokenize, and the loss means the
same thing on every corpus: cross-entropy in nats per byte, so ``loss / ln 2`` is *bits per byte*,
a number you can compare across corpora and with published compression results (a good model of
English or code sits around 1 bit per byte; a model that learned nothing, at 8).

**The default corpus** is the ``.py`` source of the standard library of the Python running this
code: tens of megabytes of real, varied code, present on every machine, needing no network.
Validation files are held out *by file*: a file goes to validation when a stable hash of its path
lands in the last ``val_fraction`` of the hash range. A random slice of one long text would put the
other half of the same function into training, and the validation loss would reward memorising
it; whole held-out files measure what we want, how well the model predicts code it has not seen.
The bytes are cached under ``cache_dir`` on first use (well under a second to build), keyed by
the interpreter's version and the list of files, so another Python never reads a stale cache.

Other corpora: ``load_corpus("path/to/file.txt")`` reads any UTF-8 text file (the last
``val_fraction`` of its bytes is validation), and ``load_corpus("tinystories")`` loads the
TinyStories data set through the optional ``datasets`` package (online once, cached afterwards).

**Batches** (:func:`batch_at`) are a pure function of ``(seed, step)``: no iterator state to save
in a checkpoint, so resuming a run at step ``s`` replays exactly the batches it would have seen,
and every rank of a multi-GPU run draws the same global batch and keeps its own rows.
:func:`eval_windows` gives the same validation windows every time, so validation losses of
different runs are measured on the same bytes.

**Synthetic tasks** (:func:`associative_recall_batch`, :func:`copy_offset_batch`) answer one
mechanistic question each in a few hundred steps: can attention look up a value by its key, and
can it attend to a fixed relative position.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arguments import non_negative_int, number, positive_int
from .runs import write_atomically

__all__ = [
    "IGNORE_INDEX",
    "ByteCorpus",
    "associative_recall_batch",
    "batch_at",
    "copy_offset_batch",
    "default_cache_dir",
    "eval_windows",
    "load_corpus",
    "load_tinystories",
]

#: Target value that cross-entropy skips (PyTorch's default ``ignore_index``).
IGNORE_INDEX = -100

#: Hub id of TinyStories; ``$RBF_TUTORIAL_TINYSTORIES`` may name another id or a local folder instead.
TINYSTORIES_HUB_ID = "roneneldan/TinyStories"

# Bump when the way a corpus is assembled changes, so old cache files are never read back.
_CACHE_FORMAT = 1

# Folders of the standard library that are not part of the corpus:
# - site-packages / dist-packages: third-party code that differs from one environment to the next;
#   the corpus must depend on the interpreter only.
# - encodings, pydoc_data: generated tables (charmaps) and one 750 kB string of documentation:
#   trivially predictable or not code, they would flatter the loss.
# - __pycache__: bytecode, not text.
# The test suite (test/, */tests/) stays: it is more than half of the library's code, idiomatic and
# varied, and a training run of a few minutes on a GPU reads ~100 MB, so the volume matters
# (without it the training split is ~11 MB and a short run would already repeat it many times).
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "encodings", "pydoc_data", "__pycache__"})


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class ByteCorpus:
    """A text corpus as bytes: ``train`` and ``val`` are 1-D ``uint8`` tensors, one token per byte."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            tokens = getattr(self, name)
            if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.uint8 or tokens.dim() != 1:
                raise TypeError(f"{name}: expected a 1-D uint8 tensor of bytes, got {_describe(tokens)}")


# --------------------------------------------------------------------------------------------------
# Loading a corpus
# --------------------------------------------------------------------------------------------------


def load_corpus(
    data: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
) -> ByteCorpus:
    """Load a byte-level corpus, split into training and validation bytes.

    ``data``:

    * ``None`` or ``"stdlib"``: the ``.py`` files of this interpreter's standard library, offline
      and deterministic, validation held out by file (see the module docstring);
    * ``"tinystories"``: TinyStories through the optional ``datasets`` package (:func:`load_tinystories`);
    * anything else: the path of a UTF-8 text file; the last ``val_fraction`` of its bytes is
      validation. (A file literally named ``stdlib`` or ``tinystories`` is read as ``./stdlib``.)

    ``cache_dir`` holds built corpora; it defaults to :func:`default_cache_dir`.
    """
    val_fraction = _check_val_fraction(val_fraction)
    if data is None or (isinstance(data, str) and data.strip().lower() == "stdlib"):
        return _load_stdlib(val_fraction=val_fraction, cache_dir=cache_dir)
    if isinstance(data, str) and data.strip().lower() == "tinystories":
        return load_tinystories(val_fraction=val_fraction, cache_dir=cache_dir)
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data: expected None, 'stdlib', 'tinystories' or a path, got {_describe(data)}")
    return _load_text_file(Path(data), val_fraction=val_fraction)


def default_cache_dir() -> Path:
    """Where built corpora are kept: ``$RBF_TUTORIAL_CACHE``, else ``~/.cache/rbf-tutorial``."""
    configured = os.environ.get("RBF_TUTORIAL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rbf-tutorial"


def _load_text_file(path: Path, *, val_fraction: float) -> ByteCorpus:
    hint = "pass a UTF-8 text file, 'stdlib' or 'tinystories'"
    if not path.exists():
        raise ValueError(f"data (--data): no such file: '{path}' ({hint})")
    if path.is_dir():
        raise ValueError(f"data (--data): '{path}' is a directory ({hint})")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 2:
        raise ValueError(
            f"data (--data): '{path}' holds {raw.size} byte(s); a corpus needs at least 2 "
            "(one for training, one for validation)"
        )
    try:
        codecs.utf_8_decode(raw.data, "strict", True)  # only to check; the bytes are the tokens
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data (--data): '{path}' is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from err
    tokens = torch.from_numpy(raw)
    n_val = min(max(1, round(tokens.numel() * val_fraction)), tokens.numel() - 1)
    n_train = tokens.numel() - n_val
    source = (
        f"text file {path.name}: {tokens.numel() / 1e6:.2f} MB, split by position "
        f"(train {n_train / 1e6:.2f} MB, validation the last {n_val / 1e6:.2f} MB)"
    )
    return ByteCorpus(train=tokens[:n_train], val=tokens[n_train:], source=source)


# ---- the standard library ------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[tuple[str, Path, int]]:
    """``(relative posix path, path, size in bytes)`` of every corpus file, sorted by relative path."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_STDLIB_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling symlink: not part of the library
                    continue
                found.append((path.relative_to(root).as_posix(), path, size))
    found.sort(key=lambda entry: entry[0])
    return found


def _hash_fraction(relative_path: str) -> float:
    """A stable number in [0, 1) from a file's path (unlike ``hash()``, the same in every process)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_by_file(relative_paths: list[str], val_fraction: float) -> list[bool]:
    """For each path, True when the file belongs to validation: its hash lies in the last ``val_fraction``.

    Both sides get at least one file, so a small library or an extreme fraction never yields an
    empty split.
    """
    fractions = [_hash_fraction(path) for path in relative_paths]
    is_val = [fraction >= 1.0 - val_fraction for fraction in fractions]
    if len(relative_paths) >= 2:
        if not any(is_val):
            is_val[max(range(len(fractions)), key=fractions.__getitem__)] = True
        if all(is_val):
            is_val[min(range(len(fractions)), key=fractions.__getitem__)] = False
    return is_val


def _stdlib_texts(files: list[tuple[str, Path, int]]) -> list[bytes | None]:
    """Each file's bytes, ending in a newline; None for a file that is not UTF-8.

    A few test files are deliberately written in Latin-1 or KOI8-R to test source encodings; a
    corpus of UTF-8 text leaves them out.
    """
    texts: list[bytes | None] = []
    for _, path, _ in files:
        text = path.read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            texts.append(None)
            continue
        texts.append(text if text.endswith(b"\n") else text + b"\n")
    return texts


def _stdlib_cache_key(files: list[tuple[str, Path, int]], val_fraction: float) -> str:
    """A name that changes with the interpreter, the list of files (and their sizes) and the split."""
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_FORMAT}|{sys.implementation.name}|{sys.version}|{val_fraction!r}".encode())
    for relative_path, _, size in files:
        digest.update(f"\n{relative_path}\t{size}".encode())
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return f"stdlib-{version}-{digest.hexdigest()[:16]}"


def _build_stdlib(files: list[tuple[str, Path, int]], val_fraction: float) -> tuple[bytes, bytes]:
    """Training and validation bytes: the files of each side in sorted order, a blank line between."""
    is_val = _split_by_file([relative_path for relative_path, _, _ in files], val_fraction)
    texts = _stdlib_texts(files)
    pairs = list(zip(texts, is_val, strict=True))
    train = b"\n".join(text for text, val in pairs if text is not None and not val)
    val = b"\n".join(text for text, val in pairs if text is not None and val)
    return train, val


def _load_stdlib(*, val_fraction: float, cache_dir: str | os.PathLike | None) -> ByteCorpus:
    root = _stdlib_root()
    files = _stdlib_files(root)
    if len(files) < 2:
        raise RuntimeError(
            f"the standard library at {root} has {len(files)} .py file(s); this Python ships without "
            "its sources: pass --data PATH (a UTF-8 text file) instead"
        )
    key = _stdlib_cache_key(files, val_fraction)
    train, val = _cached_pair(_resolve_cache_dir(cache_dir), key, lambda: _build_stdlib(files, val_fraction))
    is_val = _split_by_file([relative_path for relative_path, _, _ in files], val_fraction)
    n_val_files = sum(is_val)
    version = ".".join(map(str, sys.version_info[:3]))
    source = (
        f"Python {version} standard library (.py sources): "
        f"train {len(files) - n_val_files} files, {train.numel() / 1e6:.1f} MB; "
        f"validation {n_val_files} held-out files, {val.numel() / 1e6:.1f} MB"
    )
    return ByteCorpus(train=train, val=val, source=source)


# ---- TinyStories ----------------------------------------------------------------------------------


def load_tinystories(
    *,
    source: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    hf_cache_dir: str | os.PathLike | None = None,
) -> ByteCorpus:
    """TinyStories (short, simple English stories) as bytes, through the optional ``datasets`` package.

    ``source`` is a Hub id, or a local folder laid out as a data set (``train.jsonl`` and
    ``validation.jsonl`` with a ``"text"`` column, say); it defaults to ``$RBF_TUTORIAL_TINYSTORIES``,
    else ``roneneldan/TinyStories``. A local folder is read offline (``HF_DATASETS_OFFLINE=1``).
    Stories are joined with a blank line; the data set's own ``validation`` split is used when it
    has one, else the last ``val_fraction`` of the training bytes. ``hf_cache_dir`` is passed to
    ``datasets.load_dataset`` as its ``cache_dir`` (default: the ``datasets`` library's own cache).
    The bytes are cached under ``cache_dir``, keyed by the data set's fingerprints.
    """
    val_fraction = _check_val_fraction(val_fraction)
    if source is None:
        source = os.environ.get("RBF_TUTORIAL_TINYSTORIES") or TINYSTORIES_HUB_ID
    source = os.fspath(source)
    is_local = Path(source).exists()
    advice = "pip install datasets, be online once to download it, or pass --data PATH (a UTF-8 text file)"
    if is_local:
        # Read before `datasets` is first imported: a local folder must never reach for the network.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"data='tinystories' needs the `datasets` package: {advice}") from err

    hf_cache = None if hf_cache_dir is None else os.fspath(hf_cache_dir)
    try:
        splits = datasets.load_dataset(source, cache_dir=hf_cache)
    except Exception as err:  # offline, not cached, unknown id: all end the same way for the learner
        raise RuntimeError(
            f"data='tinystories': could not load '{source}' ({type(err).__name__}: {err}). {advice}"
        ) from err
    if "train" not in splits:
        raise ValueError(f"data='tinystories': '{source}' has no 'train' split (it has {sorted(splits)})")
    train_split = splits["train"]
    val_split = splits["validation"] if "validation" in splits else None
    for split in (train_split, val_split):
        if split is not None and "text" not in split.column_names:
            raise ValueError(
                f"data='tinystories': '{source}' has no 'text' column (it has {split.column_names})"
            )

    fingerprints = [getattr(split, "_fingerprint", None) for split in (train_split, val_split)]
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{source}|{fingerprints}|{val_fraction!r}".encode())
    key = f"tinystories-{digest.hexdigest()[:16]}"

    def build() -> tuple[bytes, bytes]:
        train = _join_stories(train_split)
        if val_split is not None:
            return train, _join_stories(val_split)
        n_val = min(max(1, round(len(train) * val_fraction)), len(train) - 1)
        return train[: len(train) - n_val], train[len(train) - n_val :]

    train, val = _cached_pair(_resolve_cache_dir(cache_dir), key, build)
    if train.numel() == 0 or val.numel() == 0:
        raise ValueError(f"data='tinystories': '{source}' gave an empty training or validation split")
    val_words = (
        f"validation {val_split.num_rows:,} stories" if val_split is not None else "validation the last part"
    )
    description = (
        f"TinyStories ({source}): train {train_split.num_rows:,} stories, {train.numel() / 1e6:.1f} MB; "
        f"{val_words}, {val.numel() / 1e6:.1f} MB"
    )
    return ByteCorpus(train=train, val=val, source=description)


def _join_stories(split) -> bytes:
    """All stories of a ``datasets`` split as UTF-8, a blank line between two, read in batches."""
    pieces = [
        "\n\n".join(text for text in batch["text"] if text).encode("utf-8")
        for batch in split.iter(batch_size=10_000)
    ]
    return b"\n\n".join(piece for piece in pieces if piece)


# ---- caching --------------------------------------------------------------------------------------


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _cached_pair(
    cache_dir: Path, key: str, build: Callable[[], tuple[bytes, bytes]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` uint8 tensors from ``cache_dir/key.{train,val}.bin``, building them if absent.

    Each file is written to a temporary name and renamed into place: a rename is atomic, so an
    interrupted run or several ranks building at once never leave a half-written file to be read.
    An unwritable cache is not an error; the corpus is then rebuilt on every load.
    """
    paths = [cache_dir / f"{key}.{split}.bin" for split in ("train", "val")]
    if all(path.is_file() and path.stat().st_size > 0 for path in paths):
        train, val = (torch.from_numpy(np.fromfile(path, dtype=np.uint8)) for path in paths)
        return train, val
    built = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, content in zip(paths, built, strict=True):
            write_atomically(path, content)
    except OSError as err:
        warnings.warn(
            f"could not cache the corpus in {cache_dir} ({err}); it will be rebuilt next time", stacklevel=3
        )
    train, val = (torch.frombuffer(bytearray(content), dtype=torch.uint8) for content in built)
    return train, val


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def batch_at(
    tokens: torch.Tensor,
    *,
    step: int,
    batch_size: int,
    context: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch number ``step``: ``batch_size`` random windows of ``context + 1`` tokens.

    Stateless: the global batch is a pure function of ``(seed, step)`` (and the tokens), so a run
    resumed at step ``s`` sees exactly the batches it would have seen, and no data-loader state
    goes into a checkpoint. With ``world_size`` ranks, every rank draws the same global batch and
    keeps rows ``rank * rows : (rank + 1) * rows`` where ``rows = batch_size // world_size``; the
    ranks' shares, concatenated in rank order, are the global batch.

    Returns int64 ``(inputs, targets)``, each ``(rows, context)``, on ``device`` (default: the
    device of ``tokens``), with ``targets[:, t] == inputs[:, t + 1]``: the token after position t.
    """
    _check_tokens(tokens)
    step = non_negative_int("step", step)
    batch_size = positive_int("batch_size", batch_size)
    context = positive_int("context", context)
    seed = non_negative_int("seed", seed)
    world_size = positive_int("world_size", world_size)
    rank = non_negative_int("rank", rank)
    if rank >= world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size: {batch_size} is not divisible by world_size {world_size} "
            "(every rank takes an equal share of the global batch)"
        )
    _check_length(tokens, context)

    generator = torch.Generator().manual_seed(_step_seed(seed, step))
    starts = torch.randint(0, tokens.numel() - context, (batch_size,), generator=generator)
    rows = batch_size // world_size
    return _windows(tokens, starts[rank * rows : (rank + 1) * rows], context, device)


def eval_windows(
    tokens: torch.Tensor, *, batch_size: int, context: int, max_batches: int, device=None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: up to ``max_batches`` batches of evenly spaced windows.

    The same windows on every call and in every run, so validation losses are comparable. The
    ``batch_size * max_batches`` window starts are spread evenly from the first to the last
    possible start (fewer when the tokens have fewer distinct starts); the last batch may be
    smaller. Yields int64 ``(inputs, targets)`` as :func:`batch_at` does.
    """
    # Checked now, not at the first next(): a generator function would report bad arguments late.
    _check_tokens(tokens)
    batch_size = positive_int("batch_size", batch_size)
    context = positive_int("context", context)
    max_batches = positive_int("max_batches", max_batches)
    _check_length(tokens, context)

    last_start = tokens.numel() - context - 1
    n_windows = min(batch_size * max_batches, last_start + 1)
    starts = torch.linspace(0, last_start, n_windows, dtype=torch.float64).round().long()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, n_windows, batch_size):
            yield _windows(tokens, starts[first : first + batch_size], context, device)

    return batches()


def _step_seed(seed: int, step: int) -> int:
    # torch's CPU generator keeps only the low 32 bits of its seed, so `seed * C + step` would
    # repeat batches across (seed, step) pairs whose sums agree modulo 2**32. A hash of the pair
    # spreads every pair over those 32 bits.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def _windows(
    tokens: torch.Tensor, starts: torch.Tensor, context: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    positions = (starts[:, None] + torch.arange(context + 1)).to(tokens.device)
    # index_select, not tokens[positions]: advanced indexing of a long 1-D tensor with a 2-D index
    # is ~1000x slower on the CPU (20 ms for a 64 x 257 batch of a 27 MB corpus, 0.01 ms this way).
    window = tokens.index_select(0, positions.reshape(-1)).view(positions.shape).to(torch.int64)
    if device is not None:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]


def _check_tokens(tokens: object) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise TypeError(f"tokens: expected a 1-D tensor of token ids, got {_describe(tokens)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: expected an integer dtype (uint8 bytes or int64 ids), got {tokens.dtype}")


def _check_length(tokens: torch.Tensor, context: int) -> None:
    if tokens.numel() < context + 1:
        raise ValueError(
            f"context: {context} needs at least context + 1 = {context + 1} tokens, "
            f"but tokens has {tokens.numel()}"
        )


# --------------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------------


def associative_recall_batch(
    batch_size: int,
    *,
    n_pairs: int = 8,
    vocab_size: int = 64,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Associative recall: read ``n_pairs`` key-value pairs, then answer the value of a queried key.

    Token layout of one row (length ``T = 2 * n_pairs + 2``)::

        position  0   1   2   3  ...  2n-2  2n-1  2n   2n+1
        input     k1  v1  k2  v2 ...  kn    vn    SEP  kq
        target    -   -   -   -  ...  -     -     -    v(kq)

    Ids are split so that they never collide: keys come from ``[0, K)`` and values from
    ``[K, vocab_size - 1)`` with ``K = (vocab_size - 1) // 2``, and ``SEP = vocab_size - 1``. The
    keys of a row are distinct (so the answer is unique), values may repeat, and the query ``kq`` is
    one of the row's keys. Targets are ``IGNORE_INDEX`` (-100) everywhere except the last position,
    whose target is the value that followed ``kq``: the usual next-token convention, where the
    target at ``t`` is predicted from inputs ``0..t``.

    Returns int64 ``(inputs, targets)``, each ``(batch_size, T)``.
    """
    batch_size = positive_int("batch_size", batch_size)
    n_pairs = positive_int("n_pairs", n_pairs)
    vocab_size = positive_int("vocab_size", vocab_size)
    n_keys = (vocab_size - 1) // 2
    if n_keys < n_pairs:
        raise ValueError(
            f"vocab_size: {vocab_size} leaves {n_keys} key ids (half of vocab_size - 1, SEP is the last id), "
            f"fewer than n_pairs = {n_pairs} distinct keys; use vocab_size >= {2 * n_pairs + 1}"
        )
    separator = vocab_size - 1

    # Distinct keys per row: the first n_pairs of a random permutation of the key ids.
    draw = {"generator": generator, "device": _generator_device(generator)}
    keys = torch.rand(batch_size, n_keys, **draw).argsort(dim=1)[:, :n_pairs]
    values = torch.randint(n_keys, separator, (batch_size, n_pairs), **draw)
    query_index = torch.randint(0, n_pairs, (batch_size, 1), **draw)
    query = keys.gather(1, query_index)
    answer = values.gather(1, query_index)

    pairs = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * n_pairs)
    inputs = torch.cat([pairs, torch.full_like(query, separator), query], dim=1)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, -1:] = answer
    return _to_device(inputs, targets, device)


def copy_offset_batch(
    batch_size: int,
    *,
    length: int = 64,
    offset: int = 8,
    vocab_size: int = 32,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy at a fixed offset: the target at position ``t`` is the input token at ``t - offset``.

    Token layout (``offset = 3``)::

        position  0   1   2   3   4   5  ...
        input     a   b   c   d   e   f  ...
        target    -   -   -   a   b   c  ...

    Inputs are uniform over ``[0, vocab_size)``, so the content says nothing about the answer:
    only attending to the token exactly ``offset`` positions back does (a test of how a positional
    encoding lets attention find a relative position). Targets before ``offset`` are
    ``IGNORE_INDEX`` (-100). ``offset = 0`` (copy the current token) is allowed as a sanity check.

    Returns int64 ``(inputs, targets)``, each ``(batch_size, length)``.
    """
    batch_size = positive_int("batch_size", batch_size)
    length = positive_int("length", length)
    vocab_size = positive_int("vocab_size", vocab_size)
    offset = non_negative_int("offset", offset)
    if offset >= length:
        raise ValueError(f"offset: expected 0 <= offset < length = {length}, got {offset}")
    inputs = torch.randint(
        0, vocab_size, (batch_size, length), generator=generator, device=_generator_device(generator)
    )
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, offset:] = inputs[:, : length - offset]
    return _to_device(inputs, targets, device)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {_describe(generator)}")
    return generator.device if generator is not None else torch.device("cpu")


def _to_device(inputs: torch.Tensor, targets: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    if device is None:
        return inputs, targets
    return inputs.to(device), targets.to(device)


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_val_fraction(val_fraction: object) -> float:
    return number("val_fraction", val_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"[:120]
