"""The pieces every command shares: the progress bar and the error boundary."""

from __future__ import annotations

import pytest
import typer

from colbertkit.cli._common import handle_errors
from colbertkit.errors import ColbertkitError, UsageError
from colbertkit.progress import progress_bar


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    with progress_bar("scoring", 10) as advance:
        assert advance is None
    assert capsys.readouterr().err == ""


def test_progress_bar_on_a_terminal_advances_and_can_be_turned_off(terminal, capsys):
    with progress_bar("scoring", 10) as advance:
        assert advance is not None
        advance(10)
    assert "scoring" in capsys.readouterr().err
    with progress_bar("scoring", 10, enabled=False) as advance:
        assert advance is None


def test_error_boundary_maps_errors_to_exit_codes_and_one_line(monkeypatch, capsys):
    monkeypatch.delenv("COLBERTKIT_DEBUG", raising=False)

    @handle_errors
    def failing(error: Exception) -> None:
        raise error

    for error, code in ((ColbertkitError("broken: fix it"), 1), (UsageError("bad flag"), 2)):
        with pytest.raises(typer.Exit) as exit:
            failing(error)
        assert exit.value.exit_code == code
        assert capsys.readouterr().err.strip().splitlines() == [f"Error: {error}"]
    with pytest.raises(typer.Exit) as exit:
        failing(KeyboardInterrupt())
    assert exit.value.exit_code == 130


def test_debug_lets_the_exception_through(monkeypatch):
    monkeypatch.setenv("COLBERTKIT_DEBUG", "1")

    @handle_errors
    def failing() -> None:
        raise ColbertkitError("boom")

    with pytest.raises(ColbertkitError, match="boom"):
        failing()
