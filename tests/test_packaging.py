"""The package installs, builds and starts the way the README says.

- environment.yml and pyproject.toml name the same dependencies;
- a built wheel holds every module, `kernels/` included as `rbf_tutorial.kernels`;
- the editable install maps `rbf_tutorial.kernels` onto the repository's kernels/ folder;
- the `rbf-tutorial` command works, and `rbf-tutorial lab` makes chapters open as notebooks;
- CI runs the test command the README gives.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
import urllib.request
import zipfile
from pathlib import Path

import pytest
from lab_server import free_loopback_port, private_jupyter_environment
from lab_server import stop as stop_server

from rbf_tutorial import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = {"rbf_tutorial": REPO_ROOT / "rbf_tutorial", "rbf_tutorial/kernels": REPO_ROOT / "kernels"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return normalized(match.group(1))


def load_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# dependencies


def test_environment_yml_lists_the_pyproject_dependencies() -> None:
    yaml = pytest.importorskip("yaml")
    project = load_pyproject()["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    declared |= {requirement_name(r) for r in project["optional-dependencies"]["dev"]}

    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text(encoding="utf-8"))
    listed, pip_lines = set(), []
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            pip_lines += entry.get("pip", [])
        else:
            listed.add(requirement_name(entry))
    listed |= {requirement_name(line) for line in pip_lines if not line.startswith("-")}
    listed -= {"python", "pip"}

    assert listed == declared, (
        "environment.yml and pyproject.toml disagree: "
        f"only in environment.yml: {sorted(listed - declared)}; "
        f"only in pyproject.toml: {sorted(declared - listed)}"
    )
    assert "-e .[dev]" in pip_lines, "environment.yml should install the package: `- -e .[dev]` under pip"


# --------------------------------------------------------------------------------------------------
# the wheel and the editable install


def _source_modules() -> set[str]:
    """Every .py file of the package as its path inside a wheel, e.g. rbf_tutorial/kernels/op.py."""
    modules = set()
    for wheel_prefix, folder in PACKAGE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts:
                modules.add(f"{wheel_prefix}/{path.relative_to(folder).as_posix()}")
    return modules


def _setuptools_can_build_here() -> bool:
    """Whether this environment can build without fetching a build backend (offline-friendly)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return int(version.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    # Build from a copy: building in place would leave build/ and *.egg-info behind in the checkout.
    source = tmp_path_factory.mktemp("source")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "rbf_tutorial", source / "rbf_tutorial", ignore=skip)
    shutil.copytree(REPO_ROOT / "kernels", source / "kernels", ignore=skip)
    wheel_dir = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheel_dir)]
    if _setuptools_can_build_here():
        command.append("--no-build-isolation")
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(command)} failed:\n{build.stdout}\n{build.stderr}"
    (wheel,) = wheel_dir.glob("rbf_tutorial-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_contains_every_module_and_the_kernels(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as archive:
        names = set(archive.namelist())
    assert "rbf_tutorial/kernels/__init__.py" in names
    missing = sorted(_source_modules() - names)
    assert not missing, (
        f"the wheel lacks {missing}: add each new sub-package to [tool.setuptools] packages in pyproject.toml"
    )
    for config in ("labconfig/default_setting_overrides.json", "labconfig/page_config.json",
                   "jupyter_server_config.d/rbf-tutorial.json"):
        assert f"rbf_tutorial/jupyter_config/{config}" in names, config


@pytest.mark.slow
def test_wheel_declares_the_console_script(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert re.search(r"^rbf-tutorial\s*=\s*rbf_tutorial\.cli:main$", text, re.MULTILINE), text


def test_editable_install_maps_kernels_to_the_repository_folder() -> None:
    # Several may be found (an rbf_tutorial.egg-info in the checkout counts as one); the installed
    # one is the one pip recorded its source for.
    direct_urls = [
        distribution.read_text("direct_url.json")
        for distribution in importlib.metadata.distributions(name="rbf-tutorial")
    ]
    direct_urls = [text for text in direct_urls if text]
    if not direct_urls:
        pytest.skip("rbf-tutorial is not installed with pip (pip install -e .)")
    info = json.loads(direct_urls[0])
    if not info.get("dir_info", {}).get("editable"):
        pytest.skip("rbf-tutorial is installed from a wheel, not editable")
    installed_from = Path(urllib.request.url2pathname(info["url"].removeprefix("file://")))
    if installed_from.resolve() != REPO_ROOT:
        pytest.skip(f"the editable install points at {installed_from}, not at this checkout")

    spec = importlib.util.find_spec("rbf_tutorial.kernels")
    assert spec is not None and spec.origin is not None, "rbf_tutorial.kernels cannot be imported"
    assert Path(spec.origin).resolve() == REPO_ROOT / "kernels" / "__init__.py"


# --------------------------------------------------------------------------------------------------
# the command


def _console_script() -> Path:
    script = Path(sys.executable).parent / ("rbf-tutorial.exe" if os.name == "nt" else "rbf-tutorial")
    if not script.exists():
        pytest.skip(f"no console script at {script}: the package is not installed in this environment")
    return script


def test_doctor_reports_versions_and_kernel_mode() -> None:
    run = subprocess.run([str(_console_script()), "doctor"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"rbf-tutorial doctor failed:\n{run.stdout}\n{run.stderr}"
    import torch

    assert torch.__version__ in run.stdout
    assert re.search(r"kernels\s+(compiled|interpreted)", run.stdout), run.stdout


def test_doctor_runs_every_backend_against_the_reference(capsys) -> None:
    from rbf_tutorial import BACKENDS

    status = cli.doctor(run_backends=True)
    report = capsys.readouterr().out
    assert status == 0, report
    for backend in BACKENDS:
        assert re.search(rf"backend {backend}\s+max \|error\|", report), report


def test_python_dash_m_is_the_same_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "rbf_tutorial", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for command in ("doctor", "lab", "bench"):
        assert command in run.stdout


def _pretend_missing(monkeypatch, distribution: str) -> None:
    real_version = cli._installed_version

    def installed_version(name: str) -> str | None:
        return None if name == distribution else real_version(name)

    monkeypatch.setattr(cli, "_installed_version", installed_version)


def test_doctor_exits_non_zero_when_something_essential_is_missing(monkeypatch, capsys) -> None:
    _pretend_missing(monkeypatch, "numpy")
    assert cli.doctor() == 1
    report = capsys.readouterr().out
    assert "pip install numpy" in report


def test_doctor_names_the_fix_for_a_missing_triton(monkeypatch, capsys) -> None:
    _pretend_missing(monkeypatch, "triton")
    monkeypatch.setattr(cli.platform, "system", lambda: "Linux")
    assert cli.doctor() == 1
    assert "pip install triton" in capsys.readouterr().out


def test_forwarded_commands_receive_their_arguments_verbatim(monkeypatch) -> None:
    received = []
    fake_bench = types.ModuleType("rbf_tutorial.bench")
    fake_bench.main = lambda argv, prog: received.append((argv, prog)) or 0
    monkeypatch.setitem(sys.modules, "rbf_tutorial.bench", fake_bench)
    assert cli.main(["bench", "--help", "--seq-lens", "1024", "4096", "-x"]) == 0
    assert received == [(["--help", "--seq-lens", "1024", "4096", "-x"], "rbf-tutorial bench")]


def test_version_names_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"rbf-tutorial {importlib.metadata.version('rbf-tutorial')}"


def test_help_is_quiet_and_imports_no_torch() -> None:
    """`rbf-tutorial --help` prints the commands and nothing else: no interpreter notice, and (where no
    GPU device exists, so that none has to be asked for) no torch import, which took seconds."""
    from rbf_tutorial import runtime

    script = (
        "import sys\n"
        "from rbf_tutorial import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", f"--help wrote to stderr: {run.stderr!r}"
    for command in ("doctor", "lab", "bench", "train", "compare", "assignments"):
        assert command in run.stdout
    if runtime._no_gpu_device_file():
        assert "torch imported: False" in run.stdout, run.stdout


def test_interpreter_notice_comes_once_with_the_first_kernel() -> None:
    """Importing the package and running pure-torch attention say nothing; the first Triton kernel says
    (once) that it runs through the interpreter. Only where this package switched the interpreter on."""
    from rbf_tutorial import runtime

    if runtime.gpu_available() or not runtime.triton_installed():
        pytest.skip("the notice belongs to machines where rbf_tutorial switches the interpreter on itself")
    script = (
        "import sys, torch\n"
        "import rbf_tutorial\n"
        "q = torch.randn(1, 1, 5, 16)\n"
        "rbf_tutorial.rbf_attention(q, q, q, backend='matmul')\n"
        "sys.stderr.write('after matmul\\n')\n"
        "for _ in range(2):\n    rbf_tutorial.rbf_attention(q, q, q, backend='triton')\n"
        "sys.stderr.write('after triton\\n')\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=environment)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[0] == "after matmul" and lines[-1] == "after triton", lines
    assert len(lines) == 3 and "CPU interpreter" in lines[1], lines


def test_lab_config_switches_off_every_nbgrader_extension() -> None:
    """An installed nbgrader enables its server and JupyterLab extensions in every JupyterLab; the
    configuration `rbf-tutorial lab` puts first on JUPYTER_CONFIG_PATH switches them all off."""
    from jupyter_core.paths import jupyter_config_path
    from jupyter_server.extension.config import ExtensionConfigManager

    environment = cli.lab_environment()
    previous = os.environ.get("JUPYTER_CONFIG_PATH")
    os.environ["JUPYTER_CONFIG_PATH"] = environment["JUPYTER_CONFIG_PATH"]
    try:
        paths = jupyter_config_path()
    finally:
        if previous is None:
            del os.environ["JUPYTER_CONFIG_PATH"]
        else:
            os.environ["JUPYTER_CONFIG_PATH"] = previous
    assert paths[0] == str(cli.JUPYTER_CONFIG_DIR)
    extensions = ExtensionConfigManager(read_config_path=paths).get_jpserver_extensions()
    enabled = sorted(name for name, on in extensions.items() if on and name.startswith("nbgrader"))
    assert not enabled, f"nbgrader server extensions still enabled in `rbf-tutorial lab`: {enabled}"
    page_config = json.loads((cli.JUPYTER_CONFIG_DIR / "labconfig" / "page_config.json").read_text())
    assert page_config["disabledExtensions"].get("@jupyter/nbgrader") is True


def test_lab_command_points_at_the_chapters_and_the_shipped_settings(tmp_path, capsys) -> None:
    assert cli.main(["lab", "--dir", str(tmp_path), "--print-command", "--port", "8999", "--no-browser"]) == 0
    printed = capsys.readouterr().out
    assert f"--ServerApp.root_dir={tmp_path.resolve()}" in printed
    assert printed.rstrip().endswith("--port 8999 --no-browser"), printed
    assert str(cli.JUPYTER_CONFIG_DIR) in printed


def test_lab_serves_the_project_so_jupytext_finds_its_config(tmp_path) -> None:
    (tmp_path / "jupytext.toml").write_text('formats = "py:percent"\n')
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    command = cli.lab_command(chapters, [])
    assert f"--ServerApp.root_dir={tmp_path}" in command
    assert "--LabApp.default_url=/lab/tree/chapters" in command


def test_lab_without_a_chapters_folder_says_what_to_do(tmp_path, capsys) -> None:
    assert cli.main(["lab", "--dir", str(tmp_path / "missing")]) == 2
    assert "--dir" in capsys.readouterr().err


def test_lab_keeps_an_existing_jupyter_config_path() -> None:
    environment = cli.lab_environment({"JUPYTER_CONFIG_PATH": "/somewhere/else"})
    expected = [str(cli.JUPYTER_CONFIG_DIR), "/somewhere/else"]
    assert environment["JUPYTER_CONFIG_PATH"].split(os.pathsep) == expected



def _request_json(url: str, token: str, method: str = "GET", body: dict | None = None) -> dict | None:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


# What JupyterLab sends when a learner saves a notebook: kernel metadata, outputs, counts, view state.
SAVED_NOTEBOOK = {
    "type": "notebook",
    "format": "json",
    "content": {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {"id": "prose", "cell_type": "markdown", "metadata": {}, "source": "# A probe"},
            {
                "id": "code",
                "cell_type": "code",
                "metadata": {"tags": ["raises-exception"], "scrolled": True},
                "source": "x = 1",
                "outputs": [{"output_type": "stream", "name": "stdout", "text": "1"}],
                "execution_count": 3,
            },
        ],
    },
}


@pytest.mark.slow
def test_jupyterlab_started_by_the_cli_opens_and_saves_chapters_cleanly(tmp_path) -> None:
    """Starts `rbf-tutorial lab` on loopback, on a project laid out like this one, and checks through
    JupyterLab's REST API that Python files open as notebooks and that saving one keeps it clean."""
    script = _console_script()
    project = tmp_path / "project"
    chapters = project / "chapters"
    chapters.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "jupytext.toml", project / "jupytext.toml")
    port, token = free_loopback_port(), "rbf-tutorial-test"
    # Private Jupyter folders: the test neither reads nor writes the user's own settings.
    environment = private_jupyter_environment(tmp_path)
    command = [
        str(script), "lab", "--dir", str(chapters), "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log_path = tmp_path / "jupyterlab.log"  # outside the project, which must stay untouched
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        docmanager = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                docmanager = _request_json(f"{base}/lab/api/settings/{cli.DOCMANAGER_PLUGIN}", token)
                break
            except OSError:
                time.sleep(0.5)
        assert docmanager is not None, f"JupyterLab did not answer:\n{log_path.read_text()[-3000:]}"
        default_viewers = docmanager["schema"]["properties"]["defaultViewers"]["default"]
        assert default_viewers.get("python") == cli.JUPYTEXT_VIEWER, default_viewers

        # The viewer only exists when jupytext's JupyterLab extension is installed and enabled.
        settings = _request_json(f"{base}/lab/api/settings", token)["settings"]
        plugin_ids = {plugin["id"] for plugin in settings}
        jupytext_plugins = [name for name in plugin_ids if name.startswith("jupyterlab-jupytext")]
        assert jupytext_plugins, f"jupytext's JupyterLab extension is not loaded: {sorted(plugin_ids)}"

        # nbgrader's JupyterLab extension is switched off for the learner's session (its server
        # extensions too: the log below never mentions nbgrader).
        with urllib.request.urlopen(f"{base}/lab?token={token}", timeout=10) as response:
            page = response.read().decode()
        page_data = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                              page, re.DOTALL)  # fmt: skip
        assert page_data, "JupyterLab's page carries no jupyter-config-data"
        disabled = json.loads(page_data.group(1)).get("disabledExtensions", [])
        assert "@jupyter/nbgrader" in disabled, disabled

        # Saving through JupyterLab must honour jupytext.toml: percent format, a header holding only
        # the kernelspec, no outputs.
        probe_url = f"{base}/api/contents/chapters/99_probe.py"
        _request_json(probe_url, token, "PUT", SAVED_NOTEBOOK)
        saved = (chapters / "99_probe.py").read_text()
        header, separator, body = saved.partition("# ---\n\n")
        assert separator and header.startswith("# ---\n# jupyter:\n#   kernelspec:"), saved
        assert body.startswith("# %% [markdown]"), f"saved in another format:\n{saved}"
        assert '# %% tags=["raises-exception"]' in saved, saved
        for leaked in ("language_info", "jupytext_version", "scrolled", "execution_count", "stdout"):
            assert leaked not in saved, f"{leaked!r} was saved into the chapter:\n{saved}"
        _request_json(probe_url, token, "DELETE")
    finally:
        stop_server(server)
    log = log_path.read_text()
    assert "nbgrader" not in log.lower(), f"nbgrader's server extensions ran in the lab:\n{log[-3000:]}"
    # Deleting the probe leaves JupyterLab's (git-ignored) checkpoints folder; anything else is a leak.
    left_behind = sorted(
        path.relative_to(project).as_posix()
        for path in project.rglob("*")
        if ".ipynb_checkpoints" not in path.parts
    )
    assert left_behind == ["chapters", "jupytext.toml"], f"JupyterLab left files behind: {left_behind}"


# --------------------------------------------------------------------------------------------------
# CI runs what the README promises


def test_ci_runs_the_readme_test_command() -> None:
    ci_script = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"^README_TEST_COMMAND='([^']+)'$", ci_script, re.MULTILINE)
    assert match, ".ci/run should define README_TEST_COMMAND='...' and run it"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert match.group(1) in readme, f"README.md does not show the command CI runs: {match.group(1)}"


@pytest.mark.slow
def test_readme_library_example_runs(capsys) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## The library\n+```python\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md should have a python example under '## The library'"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # the example as a reader would paste it
    assert namespace["out"].shape == namespace["q"].shape
