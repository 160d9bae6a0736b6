"""What the tests that start a real JupyterLab share: a free loopback port and private Jupyter folders."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def private_jupyter_environment(folder: Path) -> dict[str, str]:
    """os.environ with every Jupyter config, settings, workspace and runtime folder under ``folder``,
    so a test neither reads nor writes the user's own settings."""
    environment = dict(os.environ)
    for variable, name in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTERLAB_SETTINGS_DIR", "user-settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
    ):
        environment[variable] = str(folder / name)
    return environment


def stop(server: subprocess.Popen) -> None:
    """Ask the server to stop; kill it if it has not within 20 s."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
