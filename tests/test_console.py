"""Progress under a redirect: plain log lines at an interval and at the end, and stage rates without spikes."""

from __future__ import annotations

import io

from rich.console import Console

from distillery import console as console_module
from distillery.cache.writer import stage_rates


def test_progress_becomes_log_lines_when_the_output_is_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=stream, force_terminal=False, width=200))
    monkeypatch.setenv("DISTILLERY_PROGRESS_SECONDS", "0")
    with console_module.progress_bar("loss") as progress:
        assert isinstance(progress, console_module.LogProgress)
        task = progress.add_task("train", total=4, loss="")
        for step in range(4):
            progress.update(task, advance=1, loss=f"loss {1.0 / (step + 1):.2f}")
        progress.update(task, advance=0)  # a finished task prints no more
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].endswith("loss 0.25")
    assert "train: 1/4 (25%)" in lines[0] and "ETA" in lines[0] and "train: 4/4 (100%)" in lines[-1]
    assert "ETA" not in lines[-1]


def test_progress_lines_wait_for_the_interval(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=stream, force_terminal=False, width=200))
    monkeypatch.setenv("DISTILLERY_PROGRESS_SECONDS", "3600")
    with console_module.progress_bar() as progress:
        task = progress.add_task("cache", total=1000)
        for _ in range(999):
            progress.advance(task)
        assert stream.getvalue() == ""  # nothing before the interval...
        progress.advance(task)
    assert "cache: 1,000/1,000 (100%)" in stream.getvalue()  # ...but always the end


def test_a_stage_that_has_not_run_shows_no_rate():
    rates = stage_rates({"decode": 500, "forward": 256, "write": 0}, {"decode": 1.0, "forward": 0.5, "write": 0.0})
    assert rates == "decode 500 img/s · forward 512 img/s · write ..."
    assert "write ..." in stage_rates({"decode": 1, "forward": 1, "write": 500}, {"decode": 1, "forward": 1, "write": 1e-9})


def test_version_from_the_script_and_from_python_dash_m():
    import subprocess
    import sys

    import distillery
    from typer.testing import CliRunner

    from distillery.cli import app

    assert CliRunner().invoke(app, ["--version"]).stdout.strip() == f"distillery {distillery.__version__}"
    out = subprocess.run([sys.executable, "-m", "distillery", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"distillery {distillery.__version__}"
