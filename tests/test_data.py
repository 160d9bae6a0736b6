"""Data: the stdlib corpus is deterministic, cached and split by file; batches are a pure function
of (seed, step); validation windows are fixed; TinyStories loads from a local fixture with no
network; the synthetic tasks' answers can be read off their inputs."""

from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from rbf_tutorial import data, runs
from rbf_tutorial.data import (
    IGNORE_INDEX,
    ByteCorpus,
    associative_recall_batch,
    batch_at,
    copy_offset_batch,
    eval_windows,
    load_corpus,
    load_tinystories,
)

TINYSTORIES_FIXTURE = Path(__file__).parent / "fixtures" / "tinystories"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test's default cache is its own folder: nothing is written to ~/.cache."""
    monkeypatch.setenv("RBF_TUTORIAL_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("RBF_TUTORIAL_TINYSTORIES", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stdlib-cache")


@pytest.fixture(scope="module")
def stdlib_corpus(stdlib_cache) -> ByteCorpus:
    return load_corpus(cache_dir=stdlib_cache)


def as_bytes(tokens: torch.Tensor) -> bytes:
    return tokens.numpy().tobytes()


# ---- the standard-library corpus -------------------------------------------------------------------


def test_stdlib_corpus_is_bytes_with_a_description(stdlib_corpus):
    assert stdlib_corpus.train.dtype == torch.uint8 and stdlib_corpus.train.dim() == 1
    assert stdlib_corpus.val.dtype == torch.uint8 and stdlib_corpus.val.dim() == 1
    assert stdlib_corpus.vocab_size == 256
    assert stdlib_corpus.train.numel() > 1_000_000 and stdlib_corpus.val.numel() > 10_000
    assert "standard library" in stdlib_corpus.source and "files" in stdlib_corpus.source


def test_stdlib_by_name_uses_the_default_cache(stdlib_corpus, tmp_path):
    # cache_dir=None: $RBF_TUTORIAL_CACHE, a private folder per test (see private_cache).
    corpus = load_corpus("stdlib")
    assert torch.equal(corpus.val, stdlib_corpus.val) and corpus.source == stdlib_corpus.source
    assert len(list((tmp_path / "default-cache").glob("stdlib-*.bin"))) == 2


def test_stdlib_cache_hit_equals_a_fresh_build(stdlib_corpus, stdlib_cache, tmp_path):
    cached_files = sorted(path.name for path in stdlib_cache.iterdir())
    assert len(cached_files) == 2 and all(name.endswith(".bin") for name in cached_files), cached_files
    from_cache = load_corpus(cache_dir=stdlib_cache)
    fresh = load_corpus(cache_dir=tmp_path / "fresh")
    for corpus in (from_cache, fresh):
        assert torch.equal(corpus.train, stdlib_corpus.train)
        assert torch.equal(corpus.val, stdlib_corpus.val)
        assert corpus.source == stdlib_corpus.source
    assert sorted(path.name for path in stdlib_cache.iterdir()) == cached_files  # no temporary left


def test_stdlib_split_is_by_file(stdlib_corpus):
    files = data._stdlib_files(data._stdlib_root())
    is_val = data._split_by_file([relative for relative, _, _ in files], 0.05)
    assert 0.02 < sum(is_val) / len(files) < 0.1  # the hash spreads files evenly
    # (relative path, content, held out?) for every file, in the corpus's sorted order
    sides = [
        (relative, path.read_bytes(), held_out)
        for (relative, path, _), held_out in zip(files, is_val, strict=True)
    ]
    train_contents = {content for _, content, held_out in sides if not held_out}
    train, val = as_bytes(stdlib_corpus.train), as_bytes(stdlib_corpus.val)
    checked = 0
    for relative, content, held_out in sides:
        if len(content) < 2000 or not held_out or content in train_contents:
            continue  # tiny files and verbatim copies may legitimately appear on both sides
        assert content in val, relative
        assert content not in train, f"held-out file {relative} leaked into training"
        checked += 1
    assert checked >= 20
    # Sorted order: the training text starts with the first (non-empty) training file.
    first_train = next(content for _, content, held_out in sides if not held_out and content)
    assert train.startswith(first_train)


def test_stdlib_excludes_site_packages_and_non_utf8(stdlib_corpus):
    files = data._stdlib_files(data._stdlib_root())
    assert not any("site-packages" in relative.split("/") for relative, _, _ in files)
    assert all(relative.endswith(".py") for relative, _, _ in files)
    assert [relative for relative, _, _ in files] == sorted(relative for relative, _, _ in files)
    # The whole corpus is UTF-8 text.
    as_bytes(stdlib_corpus.train).decode("utf-8")
    as_bytes(stdlib_corpus.val).decode("utf-8")


def test_stdlib_cache_key_follows_interpreter_files_and_split(monkeypatch):
    files = data._stdlib_files(data._stdlib_root())
    key = data._stdlib_cache_key(files, 0.05)
    assert key == data._stdlib_cache_key(list(files), 0.05)
    assert key != data._stdlib_cache_key(files, 0.1)
    assert key != data._stdlib_cache_key(files[1:], 0.05)
    relative, path, size = files[0]
    assert key != data._stdlib_cache_key([(relative, path, size + 1), *files[1:]], 0.05)
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert key != data._stdlib_cache_key(files, 0.05)


def test_split_by_file_never_leaves_a_side_empty():
    paths = [f"module_{index}.py" for index in range(5)]
    for fraction in (1e-9, 0.5, 1 - 1e-9):
        is_val = data._split_by_file(paths, fraction)
        assert any(is_val) and not all(is_val)
    assert data._split_by_file(paths, 0.3) == data._split_by_file(list(paths), 0.3)


def test_interrupted_cache_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "corpus.train.bin"

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs.write_atomically(target, b"some bytes")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_warns_and_still_loads(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("occupied")
    with pytest.warns(UserWarning, match="could not cache"):
        train, val = data._cached_pair(not_a_folder, "key", lambda: (b"abc", b"de"))
    assert as_bytes(train) == b"abc" and as_bytes(val) == b"de"


# ---- a text file -----------------------------------------------------------------------------------


def test_text_file_round_trip(tmp_path):
    text = "def greet(name):\n    return f'héllo, {name} ✓'\n" * 50
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    for data_argument in (str(path), path):
        corpus = load_corpus(data_argument, val_fraction=0.1)
        assert as_bytes(corpus.train) + as_bytes(corpus.val) == text.encode("utf-8")
        assert corpus.val.numel() == round(len(text.encode("utf-8")) * 0.1)
        assert "corpus.txt" in corpus.source
        assert corpus.vocab_size == 256


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp: tmp / "missing.txt", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "empty.txt", (tmp / "empty.txt").write_bytes(b""))[0], "0 byte"),
        (
            lambda tmp: (tmp / "latin1.txt", (tmp / "latin1.txt").write_bytes("café".encode("latin-1")))[0],
            "not UTF-8",
        ),
    ],
    ids=["missing", "directory", "empty", "not-utf8"],
)
def test_text_file_errors_name_data(tmp_path, make_path, message):
    with pytest.raises(ValueError, match=rf"data \(--data\).*{message}"):
        load_corpus(make_path(tmp_path))


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_is_checked(tmp_path, fraction):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(path, val_fraction=fraction)


def test_corpus_refuses_non_byte_tensors():
    with pytest.raises(TypeError, match="train"):
        ByteCorpus(train=torch.arange(10), val=torch.zeros(3, dtype=torch.uint8), source="x")


# ---- batches ---------------------------------------------------------------------------------------

# Token ids equal to their position, so every window reveals where it starts.
POSITIONS = torch.arange(5000)


def test_batch_at_is_a_pure_function_of_seed_and_step():
    first = batch_at(POSITIONS, step=7, batch_size=8, context=16, seed=3)
    again = batch_at(POSITIONS, step=7, batch_size=8, context=16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_step = batch_at(POSITIONS, step=8, batch_size=8, context=16, seed=3)
    other_seed = batch_at(POSITIONS, step=7, batch_size=8, context=16, seed=4)
    assert not torch.equal(first[0], other_step[0])
    assert not torch.equal(first[0], other_seed[0])


def test_batch_at_windows_are_contiguous_and_targets_shifted():
    inputs, targets = batch_at(POSITIONS, step=0, batch_size=16, context=32, seed=0)
    assert inputs.shape == targets.shape == (16, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    starts = inputs[:, 0]
    assert torch.equal(inputs, starts[:, None] + torch.arange(32))
    assert torch.equal(targets, starts[:, None] + 1 + torch.arange(32))
    assert int(starts.min()) >= 0 and int(starts.max()) + 32 < POSITIONS.numel()


def test_batch_at_on_bytes_returns_int64():
    text = torch.frombuffer(bytearray(b"the quick brown fox jumps over a lazy dog " * 10), dtype=torch.uint8)
    inputs, targets = batch_at(text, step=1, batch_size=4, context=10, seed=0, device="cpu")
    assert inputs.dtype == torch.int64 and targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_rank_shares_concatenate_to_the_global_batch(world_size):
    global_inputs, global_targets = batch_at(POSITIONS, step=11, batch_size=8, context=12, seed=5)
    shares = [
        batch_at(POSITIONS, step=11, batch_size=8, context=12, seed=5, rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    assert all(inputs.shape == (8 // world_size, 12) for inputs, _ in shares)
    assert torch.equal(torch.cat([inputs for inputs, _ in shares]), global_inputs)
    assert torch.equal(torch.cat([targets for _, targets in shares]), global_targets)


def test_batch_at_with_exactly_context_plus_one_tokens():
    inputs, targets = batch_at(torch.arange(9), step=3, batch_size=2, context=8, seed=0)
    assert torch.equal(inputs, torch.arange(8).repeat(2, 1))
    assert torch.equal(targets, torch.arange(1, 9).repeat(2, 1))


@pytest.mark.parametrize(
    "overrides, error, name",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 6, "world_size": 4}, ValueError, "batch_size"),
        ({"context": 0}, ValueError, "context"),
        ({"context": 5000}, ValueError, "context"),
        ({"step": -1}, ValueError, "step"),
        ({"seed": -2}, ValueError, "seed"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"world_size": 0}, ValueError, "world_size"),
        ({"step": 1.5}, TypeError, "step"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"tokens": torch.rand(100)}, TypeError, "tokens"),
        ({"tokens": torch.arange(100).reshape(10, 10)}, TypeError, "tokens"),
    ],
)
def test_batch_at_checks_its_arguments(overrides, error, name):
    arguments = {"tokens": POSITIONS, "step": 0, "batch_size": 4, "context": 8, "seed": 0} | overrides
    tokens = arguments.pop("tokens")
    with pytest.raises(error, match=name):
        batch_at(tokens, **arguments)


def test_eval_windows_are_fixed_and_evenly_spaced():
    first = list(eval_windows(POSITIONS, batch_size=4, context=10, max_batches=3))
    again = list(eval_windows(POSITIONS, batch_size=4, context=10, max_batches=3))
    assert len(first) == 3
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, again, strict=True))
    inputs = torch.cat([inputs for inputs, _ in first])
    targets = torch.cat([targets for _, targets in first])
    assert inputs.shape == (12, 10) and inputs.dtype == torch.int64
    starts = inputs[:, 0]
    assert int(starts[0]) == 0 and int(starts[-1]) == POSITIONS.numel() - 11
    gaps = starts.diff()
    assert int(gaps.max() - gaps.min()) <= 1  # evenly spaced, up to rounding
    assert torch.equal(targets, inputs + 1)


def test_eval_windows_on_short_tokens_yield_fewer_windows():
    batches = list(eval_windows(torch.arange(13), batch_size=4, context=10, max_batches=5))
    inputs = torch.cat([inputs for inputs, _ in batches])
    assert inputs[:, 0].tolist() == [0, 1, 2]  # only three distinct windows exist
    assert [len(inputs) for inputs, _ in batches] == [3]


def test_eval_windows_checks_arguments_before_iterating():
    with pytest.raises(ValueError, match="max_batches"):
        eval_windows(POSITIONS, batch_size=4, context=10, max_batches=0)
    with pytest.raises(ValueError, match="context"):
        eval_windows(torch.arange(5), batch_size=4, context=10, max_batches=1)


# ---- TinyStories -----------------------------------------------------------------------------------


def fixture_stories(split: str) -> list[str]:
    lines = (TINYSTORIES_FIXTURE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_tinystories_from_the_local_fixture(tmp_path, monkeypatch, no_network):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # `datasets` read its default cache folder when first imported, maybe by an earlier test.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    corpus = load_tinystories(
        source=TINYSTORIES_FIXTURE, cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf-cache"
    )
    assert as_bytes(corpus.train) == "\n\n".join(fixture_stories("train")).encode("utf-8")
    assert as_bytes(corpus.val) == "\n\n".join(fixture_stories("validation")).encode("utf-8")
    assert "12 stories" in corpus.source and "3 stories" in corpus.source
    # Through load_corpus, with the fixture named by the environment variable; cached this time.
    monkeypatch.setenv("RBF_TUTORIAL_TINYSTORIES", str(TINYSTORIES_FIXTURE))
    again = load_corpus("tinystories", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert len(list((tmp_path / "cache").glob("tinystories-*.bin"))) == 2


class FakeSplit:
    """The little of ``datasets.Dataset`` that the loader uses."""

    def __init__(self, texts: list[str], fingerprint: str):
        self.texts, self._fingerprint = texts, fingerprint
        self.column_names, self.num_rows = ["text"], len(texts)

    def iter(self, batch_size: int):
        for first in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[first : first + batch_size]}


def fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_tinystories_loader_with_a_fake_datasets_module(tmp_path, monkeypatch, no_network):
    stories = [f"Story number {index}: a cat sat on mat {index}." for index in range(25_000)]
    calls = []

    def load_dataset(source, cache_dir=None):
        calls.append(source)
        return {"train": FakeSplit(stories, "fingerprint-a")}  # no validation split: split by position

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    corpus = load_tinystories(source="some/hub-id", val_fraction=0.1, cache_dir=tmp_path)
    expected = "\n\n".join(stories).encode("utf-8")
    assert as_bytes(corpus.train) + as_bytes(corpus.val) == expected
    assert corpus.val.numel() == round(len(expected) * 0.1)
    assert calls == ["some/hub-id"]
    by_name = load_corpus("TinyStories", cache_dir=tmp_path)  # no source given: the Hub id
    assert by_name.source.startswith("TinyStories (roneneldan/TinyStories)")


def test_tinystories_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RuntimeError, match="pip install datasets.*--data PATH"):
        load_corpus("tinystories")


def test_tinystories_offline_and_not_cached_says_what_to_do(monkeypatch, no_network):
    def offline(source, cache_dir=None):
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(offline))
    with pytest.raises(RuntimeError, match="be online once.*--data PATH"):
        load_corpus("tinystories")


def test_tinystories_offline_with_the_real_datasets_package(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # `datasets` reads the offline switch once, at import: set it where the library looks now.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda *args: attempts.append(args) or 1 / 0)
    with pytest.raises(RuntimeError, match="pip install datasets.*--data PATH"):
        load_tinystories(cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf-cache")
    assert attempts == [], "offline mode still tried the network"


# ---- synthetic tasks -------------------------------------------------------------------------------


def test_associative_recall_answer_is_recoverable():
    n_pairs, vocab_size = 6, 40
    inputs, targets = associative_recall_batch(
        64, n_pairs=n_pairs, vocab_size=vocab_size, generator=torch.Generator().manual_seed(0)
    )
    length = 2 * n_pairs + 2
    assert inputs.shape == targets.shape == (64, length)
    assert inputs.dtype == targets.dtype == torch.int64
    separator, n_keys = vocab_size - 1, (vocab_size - 1) // 2
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_inputs[0 : 2 * n_pairs : 2], row_inputs[1 : 2 * n_pairs : 2]
        query = row_inputs[-1]
        assert row_inputs[2 * n_pairs] == separator and row_inputs.count(separator) == 1
        assert all(0 <= key < n_keys for key in keys) and len(set(keys)) == n_pairs
        assert all(n_keys <= value < separator for value in values)
        assert query in keys
        assert row_targets[:-1] == [IGNORE_INDEX] * (length - 1)
        assert row_targets[-1] == values[keys.index(query)]


def test_associative_recall_is_reproducible_and_checks_vocab():
    first = associative_recall_batch(4, generator=torch.Generator().manual_seed(1))
    again = associative_recall_batch(4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="vocab_size"):
        associative_recall_batch(4, n_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="n_pairs"):
        associative_recall_batch(4, n_pairs=0)


@pytest.mark.parametrize("offset", [0, 1, 8])
def test_copy_offset_targets_are_the_tokens_offset_back(offset):
    inputs, targets = copy_offset_batch(
        16, length=20, offset=offset, vocab_size=32, generator=torch.Generator().manual_seed(2), device="cpu"
    )
    assert inputs.shape == targets.shape == (16, 20)
    assert inputs.dtype == targets.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 32
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        for position in range(20):
            expected = row_inputs[position - offset] if position >= offset else IGNORE_INDEX
            assert row_targets[position] == expected


def test_copy_offset_checks_arguments():
    with pytest.raises(ValueError, match="offset"):
        copy_offset_batch(2, length=8, offset=8)
    with pytest.raises(ValueError, match="offset"):
        copy_offset_batch(2, offset=-1)
    with pytest.raises(TypeError, match="generator"):
        copy_offset_batch(2, generator=0)
