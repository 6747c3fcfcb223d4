"""histo_retrieval.errors: the exit policy (one line on stderr, status 2) and one_line."""
from __future__ import annotations

from histo_retrieval import errors


def test_run_script_turns_a_user_error_into_one_line_and_status_2(capsys) -> None:
    def main(args) -> None:
        raise errors.UserError("--data-dir x: no such folder")

    assert errors.run_script(main, None) == 2
    assert capsys.readouterr().err == "error: --data-dir x: no such folder\n"
    assert errors.run_script(lambda args: 1, None) == 1 and errors.run_script(lambda args: {"a": 1}, None) == 0


def test_one_line_keeps_the_first_line_within_the_limit() -> None:
    assert errors.one_line(RuntimeError("Error(s) in loading:\n\tMissing  key")) == "Error(s) in loading:"
    assert errors.one_line(ValueError("")) == "ValueError"
    assert errors.one_line(OSError("x" * 300)) == "x" * 197 + "..."
