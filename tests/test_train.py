"""The training loop: every variant learns, a stopped run resumes exactly, torchrun matches one process.

Runs are tiny (a few steps of a 2-layer model on a small text file), so the file stays a few
seconds of CPU apart from the two-process torchrun test.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rbf_tutorial import cli, data
from rbf_tutorial import train as training
from rbf_tutorial.model import GPT
from rbf_tutorial.train import VARIANTS, lr_factor, make_config, train
from rbf_tutorial.training_state import build_optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """About 150 kB of real Python source: enough text for tiny runs, quick to load."""
    import argparse
    import json as json_module
    import pathlib

    text = "".join(Path(module.__file__).read_text() for module in (argparse, pathlib))
    text += Path(json_module.__file__).read_text()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


def tiny(corpus_file: Path, variant: str | None = None, **overrides):
    settings = dict(
        data=str(corpus_file),
        steps=4,
        batch_size=4,
        context=32,
        eval_batches=1,
        eval_every=2,
        log_every=1,
        checkpoint_every=100,
        warmup_steps=0,
    )
    settings.update(overrides)
    return make_config("smoke", variant, **settings)


def batch_loss(model: GPT, config, step: int = 0) -> float:
    corpus = data.load_corpus(config.data)
    inputs, targets = data.batch_at(
        corpus.train, step=step, batch_size=config.batch_size, context=config.model.context, seed=config.seed
    )
    with torch.no_grad():
        return model(inputs, targets)[1].item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_lowers_the_loss_on_its_batch(variant, corpus_file, tmp_path):
    config = tiny(corpus_file, variant, steps=1)
    torch.manual_seed(config.seed)  # train() draws its initial weights the same way
    initial = GPT(config.model)
    result = train(config, tmp_path, progress=False)
    before, after = batch_loss(initial, config), batch_loss(result.model, config)
    assert after < before, f"{variant}: loss {before:.4f} -> {after:.4f} after one step on the same batch"
    assert result.metrics[-1]["step"] == 1 and math.isfinite(result.metrics[-1]["val_loss"])


def test_run_folder_holds_every_record(corpus_file, tmp_path):
    config = tiny(corpus_file, "rbf-susie-reg", steps=4, checkpoint_every=2)
    result = train(config, tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "checkpoint.pt",
        "summary.json",
    }
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    columns = {"step", "train_loss", "val_loss", "val_bpb", "lr", "tokens", "elapsed_s", "tokens_per_s",
               "grad_norm"}
    assert set(rows[0]) == columns
    evaluated = [row for row in rows if row["val_loss"] is not None]
    assert [row["step"] for row in evaluated] == [2, 4]
    assert evaluated[-1]["val_bpb"] == pytest.approx(evaluated[-1]["val_loss"] / math.log(2))
    assert rows[-1]["tokens"] == 4 * config.batch_size * config.model.context
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 4
    assert summary["final_val_loss"] == evaluated[-1]["val_loss"]
    assert summary["parameters"] == result.model.num_parameters()
    for key in ("tokens_per_s_median", "device", "torch", "triton", "wall_time_s"):
        assert key in summary
    assert training.TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_schedule_warms_up_then_decays_to_min_lr(corpus_file):
    config = tiny(corpus_file, steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    factors = [lr_factor(config, step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert lr_factor(config, 100) == pytest.approx(0.1)  # min_lr / lr at the end


def test_weight_decay_spares_embeddings_norms_and_biases(corpus_file):
    config = tiny(corpus_file, "rbf-susie-reg")
    model = GPT(config.model)
    decayed, undecayed = build_optimizer(model, config, torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == config.weight_decay and undecayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert embeddings and not embeddings & {id(p) for p in decayed["params"]}
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))


def _comparable(rows):
    """Metric rows without the timing columns, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k not in ("elapsed_s", "tokens_per_s")} for row in rows]


def test_interrupted_run_resumes_exactly(corpus_file, tmp_path):
    # Dropout on: the resumed run must also restore the random-number generator to match.
    config = tiny(corpus_file, "rbf-susie-reg-xsa", steps=6, eval_every=3, dropout=0.1)
    straight = train(config, tmp_path / "straight", progress=False)

    def stop_after_step_4(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    stopped_dir = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(config, stopped_dir, progress=False, after_step=stop_after_step_4)
    assert torch.load(stopped_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    assert json.loads((stopped_dir / "summary.json").read_text())["complete"] is False

    resumed = train(config, stopped_dir, resume=True, progress=False)
    assert _comparable(resumed.metrics) == _comparable(straight.metrics)  # bit for bit on the CPU
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_ctrl_c_on_the_command_line_saves_and_resumes(corpus_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    options = "--preset smoke --steps 5 --batch-size 4 --log-every 1 --eval-every 5 --no-progress".split()
    options += ["--data", str(corpus_file), "--out", str(out)]
    real_batch_at = data.batch_at

    def interrupted_batch_at(*args, step, **kwargs):
        if step == 3:  # Ctrl-C while fetching the 4th batch: steps 1-3 are complete
            raise KeyboardInterrupt
        return real_batch_at(*args, step=step, **kwargs)

    monkeypatch.setattr(training.data, "batch_at", interrupted_batch_at)
    assert training.main(options) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert "--resume" in capsys.readouterr().out

    monkeypatch.setattr(training.data, "batch_at", real_batch_at)
    # The run's own settings come from its checkpoint: --out and --resume are enough.
    assert training.main(["--out", str(out), "--resume", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_cli_train_end_to_end(tmp_path):
    """`rbf-tutorial train` with the default corpus (the standard library), as a learner types it."""
    out = tmp_path / "smoke"
    assert cli.main(["train", "--preset", "smoke", "--steps", "3", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 3 and math.isfinite(summary["final_val_loss"])
    assert "standard library" in summary["data"]
    assert (out / "loss.png").stat().st_size > 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(corpus_file, tmp_path):
    options = "--preset smoke --steps 4 --batch-size 8 --log-every 1 --eval-every 2 --no-progress".split()
    options += ["--data", str(corpus_file)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    environment.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command = [*launcher, "-m", "rbf_tutorial.train", *options, "--out", str(tmp_path / "two")]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    assert training.main([*options, "--out", str(tmp_path / "one")]) == 0
    one, two = (training.read_metrics(tmp_path / name) for name in ("one", "two"))
    assert [row["step"] for row in two] == [1, 2, 3, 4]
    for single, split in zip(one, two, strict=True):
        assert split["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
        if single["val_loss"] is not None:
            assert split["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize(
    ("arguments", "overrides", "named"),
    [
        (("nope",), {}, "preset"),
        (("smoke", "nope"), {}, "variant"),
        (("smoke",), {"bogus": 1}, "bogus"),
        (("smoke",), {"n_heads": 3}, "n_heads"),
        (("smoke",), {"data": "/no/such/corpus.txt"}, "data"),
        (("smoke",), {"lr": -1.0}, "lr"),
        (("smoke",), {"steps": 0}, "steps"),
        (("smoke",), {"min_lr": 1.0}, "min_lr"),
        (("smoke",), {"attention": "cosine"}, "attention"),
    ],
)
def test_make_config_names_the_bad_option(arguments, overrides, named):
    with pytest.raises(ValueError, match=named):
        make_config(*arguments, **overrides)


def test_variant_then_explicit_options(corpus_file):
    config = make_config("smoke", "rbf-susie-reg", registers=2)
    assert config.model.positional == "susie" and config.model.registers == 2
    assert config.variant is None and training.run_label(config) == "rbf-susie-reg2"
    assert training.default_out_dir(make_config("gpu10", "dot-rope")) == Path("runs/gpu10-dot-rope")
    assert make_config("original").model.d_model == 256


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        training.main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_name_the_option(corpus_file, tmp_path, capsys):
    assert "--preset" in _cli_error(capsys, ["--preset", "nope"])
    assert "--attention" in _cli_error(capsys, ["--preset", "smoke", "--attention", "cosine"])
    assert "--preset" in _cli_error(capsys, ["--out", str(tmp_path)])
    assert "backend" in _cli_error(capsys, ["--preset", "smoke", "--backend", "nope"])
    assert "data" in _cli_error(capsys, ["--preset", "smoke", "--data", str(tmp_path / "missing.txt")])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "out" in _cli_error(capsys, ["--preset", "smoke", "--out", str(blocker / "run")])
    assert "resume" in _cli_error(capsys, ["--preset", "smoke", "--out", str(tmp_path / "empty"), "--resume"])
    assert "--out" in _cli_error(capsys, ["--resume"])


def test_resume_refuses_other_settings(corpus_file, tmp_path):
    train(tiny(corpus_file, steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(tiny(corpus_file, steps=2, lr=5e-4), tmp_path, resume=True, progress=False)


def test_forwarded_commands_are_listed():
    assert cli.FORWARDED_COMMANDS["train"][0] == "rbf_tutorial.train"
    assert cli.FORWARDED_COMMANDS["compare"][0] == "rbf_tutorial.compare"


# ---------------------------------------------------------------------------------------------------
# a first run with careless inputs: one line saying what to do, exit status 2, nothing written


def _refused(capsys, argv) -> str:
    """The command's stderr, after checking it ended with status 2 and said one line."""
    with pytest.raises(SystemExit) as stopped:
        training.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, f"expected one line, got:\n{err}"
    return err


def _tiny_options(corpus_file: Path, out: Path) -> list[str]:
    options = "--preset smoke --steps 2 --batch-size 4 --log-every 1 --eval-every 2 --no-progress".split()
    return [*options, "--data", str(corpus_file), "--out", str(out)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_folder_holding_a_run_is_not_overwritten_without_asking(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert training.main(_tiny_options(corpus_file, out)) == 0
    before = _snapshot(out)
    err = _refused(capsys, _tiny_options(corpus_file, out))
    assert "already holds a run (finished after 2 steps)" in err
    assert "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(corpus_file, steps=2), out, progress=False)
    assert _snapshot(out) == before

    # Asked to, it replaces the run: a new one with other settings, no file of the old one left over.
    assert training.main([*_tiny_options(corpus_file, out), "--steps", "3", "--overwrite"]) == 0
    assert [row["step"] for row in training.read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert "--overwrite" in _cli_error(capsys, [*_tiny_options(corpus_file, out), "--resume", "--overwrite"])


def test_resuming_a_finished_run_changes_nothing(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(tiny(corpus_file, steps=2), out, progress=False)
    before = _snapshot(out)
    capsys.readouterr()
    assert training.main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert _snapshot(out) == before  # summary.json's wall time and date included
    again = train(tiny(corpus_file, steps=2), out, resume=True, progress=False)
    assert _snapshot(out) == before
    assert again.summary == first.summary and again.metrics == first.metrics
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",  # empty
        lambda data: data[: len(data) // 2],  # truncated: a crash while copying
        lambda data: data[:100],  # only the start of the zip archive
        lambda data: bytes(range(256)) * 8,  # garbage
    ],
    ids=["empty", "half", "header-only", "garbage"],
)
def test_a_damaged_checkpoint_is_named_with_what_to_do(damage, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(corpus_file, steps=2, checkpoint_every=1), out, progress=False)
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    before = _snapshot(out)
    for argv in (["--out", str(out), "--resume"], [*_tiny_options(corpus_file, out), "--resume"]):
        err = _refused(capsys, argv)
        assert str(checkpoint) in err and "--overwrite" in err, err
        assert "Traceback" not in err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds 0 byte"),
        (bytes(range(128, 256)) * 40, "not UTF-8 text"),  # a binary file
        (b"print(1)\n", "fewer than one window"),  # text, but shorter than the model's context
    ],
    ids=["empty", "binary", "too-short"],
)
def test_a_bad_data_file_is_named_and_no_run_folder_is_left(content, message, tmp_path, capsys):
    data_file = tmp_path / "corpus.bin"
    data_file.write_bytes(content)
    out = tmp_path / "run"
    err = _refused(capsys, [*_tiny_options(data_file, out)])
    assert message in err and str(data_file.name) in err, err
    assert not out.exists(), f"a failed start left {sorted(p.name for p in out.iterdir())} in {out}"
