"""The operations recipes in the README and deploy/ are valid as written."""

import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO
from pipeline.cli import cli

SERVICE = REPO / "deploy" / "systemd" / "labelcat-nightly.service"
TIMER = REPO / "deploy" / "systemd" / "labelcat-nightly.timer"


@pytest.fixture(autouse=True)
def shop_dir(tmp_path, monkeypatch):
    """The recipes' working directory, with the manifest they name."""
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "manifest.csv").write_text("path\nx.jpg\n")
    monkeypatch.chdir(tmp_path)


def _parses(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0].endswith("labelcat") and argv[1] == "run"
    ctx = cli.make_context("labelcat", argv[1:2], resilient_parsing=True)
    sub = cli.get_command(ctx, "run")
    sub.make_context("run", argv[2:], resilient_parsing=False)  # raises on an unknown option


def test_readme_crontab_line_is_a_valid_command():
    readme = (REPO / "README.md").read_text()
    lines = re.findall(r"^30 2 \* \* \*\s+cd \S+ && (labelcat run [^|]+?)(?:\s+\|\||$)", readme, flags=re.M)
    assert lines, "no crontab line in the README"
    for line in lines:
        _parses(line.strip())


def test_systemd_service_execstart_is_a_valid_command():
    exec_start = next(line.split("=", 1)[1] for line in SERVICE.read_text().splitlines() if line.startswith("ExecStart="))
    _parses(exec_start)
    assert "OnCalendar=*-*-* 02:30:00" in TIMER.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    service = SERVICE.read_text().replace("User=labelcat", "User=root").replace("WorkingDirectory=/srv/shop", f"WorkingDirectory={tmp_path}")
    labelcat = shutil.which("labelcat") or "/bin/true"
    service = service.replace("/usr/local/bin/labelcat", labelcat)
    (tmp_path / SERVICE.name).write_text(service)
    (tmp_path / TIMER.name).write_text(TIMER.read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / SERVICE.name), str(tmp_path / TIMER.name)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
