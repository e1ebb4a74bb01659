"""Entry point of every ``py_test`` in BUILD: runs pytest on the test files given as arguments.

``bazel test //:tests_research_test_tune`` runs ``python tests/pytest_main.py
tests/research/test_tune.py``. The exit status is pytest's, so a failing test, a collection
error and a file that collects no test (exit status 5) all fail the target.
"""

from __future__ import annotations

import sys

import pytest


def main(argv: list[str] | None = None) -> int:
    """Runs pytest on ``argv`` (default: the command line's arguments) and returns its exit status.

    Raises:
      SystemExit: with status 2 and a message when no test file is given.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not [a for a in args if not a.startswith("-")]:
        print(
            "usage: python tests/pytest_main.py TEST_FILE [pytest options]: name the test file to run", file=sys.stderr
        )
        raise SystemExit(2)
    return int(pytest.main(["-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    sys.exit(main())
