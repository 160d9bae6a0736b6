"""The ``rbf-tutorial`` command: check the set-up, open the chapters, run the benchmark.

    rbf-tutorial doctor          what is installed, where kernels run, what to do about gaps
    rbf-tutorial lab             JupyterLab on chapters/, chapter .py files open as notebooks
    rbf-tutorial bench [...]     the benchmark; every argument after `bench` goes to it
    rbf-tutorial assignments OUT_DIR [--chapters 00,01]   nbgrader student and instructor notebooks
    rbf-tutorial train --preset smoke [...]   train a small GPT; every argument after `train` goes to it
    rbf-tutorial compare RUN_DIR... [--out DIR]   loss curves and a results table of training runs
    rbf-tutorial --version

``python -m rbf_tutorial`` is the same command. Every module a command needs is imported when that
command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__, runtime
from .paths import default_chapters_dir

# Commands whose module parses its own arguments: `rbf-tutorial NAME ARGS...` calls
# `MODULE.main(ARGS, prog="rbf-tutorial NAME")`. Adding a command is one line here plus a
# `main(argv, *, prog)` there. The module is imported only when its command runs, so `doctor`,
# `lab` and `--help` never pay for it.
FORWARDED_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("rbf_tutorial.bench", "time every backend side by side (arguments go to rbf_tutorial.bench)"),
    "assignments": (
        "rbf_tutorial.assignments",
        "student (stubs) and instructor notebooks of the chapters, built with nbgrader",
    ),
    "train": (
        "rbf_tutorial.train",
        "train a small GPT with dot or RBF attention (arguments go to rbf_tutorial.train)",
    ),
    "compare": ("rbf_tutorial.compare", "validation loss curves and a results table of training runs"),
}

# Folder shipped inside the package; `lab` puts it first on JUPYTER_CONFIG_PATH, for its session only.
# - labconfig/default_setting_overrides.json makes "Jupytext Notebook" the default viewer for Python
#   files. It only changes a default: a viewer chosen in the user's own JupyterLab settings still wins,
#   and nothing is written to the user's settings.
# - labconfig/page_config.json and jupyter_server_config.d/rbf-tutorial.json switch off nbgrader's
#   JupyterLab and server extensions. The dev extra installs nbgrader (for `rbf-tutorial assignments`
#   and its tests), and an installed nbgrader enables itself in every JupyterLab of the environment:
#   menus, an assignments panel and "No nbgrader_config.py" lines in the log, none of which a learner
#   needs. Instructors who want them run `jupyter lab` itself.
JUPYTER_CONFIG_DIR = Path(__file__).resolve().parent / "jupyter_config"
JUPYTEXT_VIEWER = "Jupytext Notebook"
DOCMANAGER_PLUGIN = "@jupyterlab/docmanager-extension:plugin"


# ---------------------------------------------------------------------------------------------------
# doctor


@dataclass
class Finding:
    """One line of the doctor's report, and what to do about it when something is off."""

    label: str
    value: str
    advice: str | None = None
    essential: bool = False  # when True and `advice` is set, the set-up cannot run the tutorial


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int]:
    """(3, 6) from '3.6.0', '3.6.0+git1234' or '3.6.0rc1': enough to recognise a known bad release."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _device_findings() -> list[Finding]:
    import torch

    findings = [Finding("torch", torch.__version__)]
    built_for_cuda = torch.version.cuda
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        major, minor = torch.cuda.get_device_capability(0)
        findings.append(Finding("device", f"{', '.join(names)} (compute capability {major}.{minor})"))
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        findings.append(Finding("CUDA", f"{built_for_cuda}, cuDNN {cudnn if cudnn else 'not available'}"))
    else:
        findings.append(Finding("device", "CPU (no CUDA GPU visible)"))
        if built_for_cuda:
            findings.append(
                Finding(
                    "CUDA",
                    f"torch is built for CUDA {built_for_cuda} but sees no GPU",
                    advice="check `nvidia-smi` and CUDA_VISIBLE_DEVICES; until then kernels run interpreted",
                )
            )
    return findings


def _triton_findings() -> list[Finding]:
    findings = []
    triton_version = _installed_version("triton")
    on_linux = platform.system() == "Linux"
    if triton_version is None:
        if on_linux:
            advice = "pip install triton  (chapter 03 onwards and backend='triton' need it)"
        else:
            advice = (
                f"Triton publishes no wheels for {platform.system()}: chapters 00-02 work here; for the "
                "kernel chapters use Linux (WSL2 works on Windows)"
            )
        findings.append(Finding("triton", "not installed", advice=advice, essential=on_linux))
    else:
        findings.append(Finding("triton", triton_version))

    mode = runtime.kernel_mode()
    if mode == "compiled":
        findings.append(Finding("kernels", "compiled for the GPU"))
    elif mode == "interpreted":
        import torch

        if torch.cuda.is_available():
            findings.append(
                Finding(
                    "kernels",
                    "interpreted, although a GPU is visible",
                    advice="TRITON_INTERPRET is set in your environment: unset it to compile the kernels",
                )
            )
        else:
            findings.append(
                Finding(
                    "kernels",
                    "interpreted on the CPU (TRITON_INTERPRET=1): slow but correct, fine for learning",
                )
            )
    else:
        findings.append(Finding("kernels", "unavailable (no triton)"))
    return findings


def _numpy_finding() -> Finding:
    numpy_version = _installed_version("numpy")
    if numpy_version is None:
        return Finding("numpy", "not installed", advice="pip install numpy", essential=True)
    triton_version = _installed_version("triton")
    interpreter_breaks = (
        runtime.interpreting()
        and triton_version is not None
        and _major_minor(triton_version) < (3, 7)
        and _major_minor(numpy_version) >= (2, 4)
    )
    if interpreter_breaks:
        return Finding(
            "numpy",
            numpy_version,
            advice=(
                f"triton {triton_version}'s CPU interpreter fails with numpy >= 2.4: "
                "pip install 'numpy<2.4' (or a newer triton)"
            ),
        )
    return Finding("numpy", numpy_version)


def _tool_findings() -> list[Finding]:
    """The notebook stack (needed to open the chapters) and the test tools (needed to run the tests)."""
    findings = []
    for distribution in ("jupyterlab", "jupytext", "ipywidgets", "matplotlib", "tqdm"):
        version = _installed_version(distribution)
        if version is None:
            findings.append(
                Finding(distribution, "not installed", advice=f"pip install {distribution}", essential=True)
            )
        else:
            findings.append(Finding(distribution, version))
    if _installed_version("jupytext") is not None and not _jupytext_lab_extension_installed():
        findings.append(
            Finding(
                "jupytext in Lab",
                "extension missing",
                advice=(
                    "install jupytext into the same environment as jupyterlab, or chapters open as plain text"
                ),
            )
        )
    missing_test_tools = [
        name for name in ("pytest", "nbmake", "hypothesis", "ruff") if _installed_version(name) is None
    ]
    if missing_test_tools:
        findings.append(
            Finding(
                "test tools",
                "missing: " + ", ".join(missing_test_tools),
                advice='pip install -e ".[dev]"  (only needed to run the test suite)',
            )
        )
    else:
        findings.append(Finding("test tools", "installed"))
    return findings


def _jupytext_lab_extension_installed() -> bool:
    from jupyter_core.paths import jupyter_path

    return any(
        (Path(folder) / "jupyterlab-jupytext" / "package.json").is_file()
        for folder in jupyter_path("labextensions")
    )


def collect_findings() -> list[Finding]:
    """Everything `rbf-tutorial doctor` reports, in the order it prints them."""
    findings = [
        Finding("rbf-tutorial", _installed_version("rbf-tutorial") or "not installed (run from source)"),
        Finding("python", f"{platform.python_version()} ({sys.executable})"),
        Finding("platform", platform.platform()),
    ]
    findings += _device_findings()
    findings += _triton_findings()
    findings.append(_numpy_finding())
    findings += _tool_findings()
    return findings


def smoke_test_backends() -> list[Finding]:
    """Run every backend once on tiny random inputs against the float64 reference."""
    import time

    import torch

    from . import BACKENDS, rbf_attention
    from .reference import rbf_attention_reference

    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Odd lengths and Nq < Nk on purpose: they catch masking and tiling mistakes.
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for n in (7, 13, 13))
    expected = rbf_attention_reference(q, k, v, causal=True)
    # On a GPU, float32 matmuls may run in TF32 (10-bit mantissa): errors near 1e-3 are expected there.
    tolerance = 5e-3 if device == "cuda" else 1e-4
    findings = []
    for backend in BACKENDS:
        label = f"backend {backend}"
        start = time.perf_counter()
        try:
            got = rbf_attention(q.to(device), k.to(device), v.to(device), causal=True, backend=backend)
            max_error = (got.double().cpu() - expected).abs().max().item()
        except Exception as error:  # report every backend, whatever goes wrong with one
            findings.append(
                Finding(label, "failed", advice=f"{type(error).__name__}: {error}", essential=True)
            )
            continue
        seconds = time.perf_counter() - start
        value = f"max |error| {max_error:.1e} vs float64, {seconds:.2f} s"
        if not max_error <= tolerance:  # written this way round so that NaN fails too
            findings.append(
                Finding(label, value, advice="results disagree with the reference", essential=True)
            )
        else:
            findings.append(Finding(label, value))
    return findings


def doctor(run_backends: bool = False) -> int:
    findings = collect_findings()
    if run_backends:
        findings += smoke_test_backends()
    width = max(len(finding.label) for finding in findings) + 2
    print("rbf-tutorial doctor")
    for finding in findings:
        marker = "  " if finding.advice is None else ("!!" if finding.essential else " ?")
        print(f"{marker} {finding.label:<{width}}{finding.value}")
    to_do = [finding for finding in findings if finding.advice]
    if to_do:
        print("\nWhat to do:")
        for finding in to_do:
            print(f"  - {finding.label}: {finding.advice}")
    blocking = [finding for finding in to_do if finding.essential]
    if blocking:
        print(f"\n{len(blocking)} essential problem(s) (marked !!): the tutorial will not run as is.")
        return 1
    print("\nReady: `rbf-tutorial lab` opens the chapters.")
    if runtime.kernel_mode() == "interpreted":
        print("On this CPU the chapters run at small sizes; a CUDA GPU runs them at real sizes and speed.")
    return 0


# ---------------------------------------------------------------------------------------------------
# lab


def lab_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the shipped JupyterLab defaults on the path."""
    environment = dict(os.environ if base is None else base)
    existing = environment.get("JUPYTER_CONFIG_PATH")
    environment["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        [str(JUPYTER_CONFIG_DIR)] + ([existing] if existing else [])
    )
    return environment


def lab_root(chapters_dir: Path) -> Path:
    """The folder JupyterLab serves: the project around chapters/ when it has a jupytext.toml.

    Jupytext inside JupyterLab looks for its configuration only within the served folder tree. Served
    from chapters/ alone, it would miss the project's jupytext.toml, and saving a chapter would
    write notebook metadata (a kernelspec, jupytext's version) back into the .py file.
    """
    project = chapters_dir.parent
    return project if (project / "jupytext.toml").is_file() else chapters_dir


def lab_command(chapters_dir: Path, jupyter_args: list[str]) -> list[str]:
    root = lab_root(chapters_dir)
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}"]
    if root != chapters_dir:
        # Open the file browser on the chapters even though the whole project is served.
        command.append(f"--LabApp.default_url=/lab/tree/{chapters_dir.relative_to(root).as_posix()}")
    # The user's own arguments come last, so theirs win over ours.
    return command + jupyter_args


def lab(chapters_dir: Path | None, jupyter_args: list[str], print_only: bool = False) -> int:
    chapters_dir = chapters_dir or default_chapters_dir()
    if chapters_dir is None or not chapters_dir.is_dir():
        print(
            "rbf-tutorial lab: no chapters/ folder found. Run it from a checkout of rbf-tutorial "
            "(pip install -e . there), or pass --dir PATH/TO/chapters.",
            file=sys.stderr,
        )
        return 2
    chapters_dir = chapters_dir.resolve()
    command = lab_command(chapters_dir, jupyter_args)
    environment = lab_environment()
    if print_only:
        print(f"JUPYTER_CONFIG_PATH={shlex.quote(environment['JUPYTER_CONFIG_PATH'])} {shlex.join(command)}")
        return 0
    print(
        f"rbf-tutorial lab: JupyterLab on {chapters_dir}; chapter .py files open as notebooks "
        "(right-click > Open With > Editor shows the source).",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        # Become JupyterLab rather than wrapping it, so Ctrl-C and its shutdown prompt behave as usual.
        os.execve(sys.executable, command, environment)
    return subprocess.call(command, env=environment)


# ---------------------------------------------------------------------------------------------------
# forwarded commands and the parser


def run_forwarded(command: str, argv: list[str]) -> int:
    module_name, _ = FORWARDED_COMMANDS[command]
    module = importlib.import_module(module_name)
    # `prog` makes the module's usage line say `rbf-tutorial NAME` rather than its own name.
    return int(module.main(argv, prog=f"rbf-tutorial {command}") or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbf-tutorial",
        allow_abbrev=False,
        description="Distance-based (RBF) attention, from first principles to fused Triton kernels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor_parser = subcommands.add_parser(
        "doctor",
        help="show versions, the device and how kernels run, and what to do if something is missing",
        description="Exit status 1 when something essential is missing or broken.",
    )
    doctor_parser.add_argument(
        "--run-backends",
        action="store_true",
        help="also run every attention backend once on tiny inputs against the float64 reference",
    )

    lab_parser = subcommands.add_parser(
        "lab",
        allow_abbrev=False,  # `--d...` and `--p...` belong to jupyter lab, not to abbreviations of ours
        help="open the chapters in JupyterLab (other options go to `jupyter lab`, e.g. --port 8890)",
        description=(
            "Starts JupyterLab on the chapters folder with Jupytext's notebook view as the default for "
            "Python files. Options not listed here are passed to `jupyter lab`."
        ),
    )
    lab_parser.add_argument(
        "--dir", type=Path, default=None, help="chapters folder (default: the checkout's chapters/)"
    )
    lab_parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the command (with its JUPYTER_CONFIG_PATH) instead of starting JupyterLab",
    )

    for name, (_, help_text) in FORWARDED_COMMANDS.items():
        # Listed for --help only: main() hands these over before argparse sees their arguments.
        subcommands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED_COMMANDS:
        return run_forwarded(argv[0], argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "lab":
        return lab(args.dir, unknown, print_only=args.print_command)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "doctor":
        return doctor(run_backends=args.run_backends)
    parser.print_help()
    return 2
