"""Session check: enough free disk for the checkpoints the end-to-end tests write, so a full
disk reads as one clear line instead of checkpoint writes failing mid-run."""

import os
import shutil
import tempfile

import pytest

NEEDED_GIB = 1.5  # a full run peaks at ~1.0 GB under pytest's temp folder (measured with du every 5 s)


def free_disk_problem(folder, needed_gib=NEEDED_GIB):
    """None, or the reason ``folder`` cannot hold a test run's temporary files."""
    free = shutil.disk_usage(folder).free / 2**30
    if free < needed_gib:
        return (
            f"only {free:.1f} GiB free in {folder}; the test run writes up to ~1 GB of checkpoints there "
            f"(free some space or pass --basetemp on a disk with {needed_gib} GiB free)"
        )
    return None


def pytest_sessionstart(session):
    folder = os.path.abspath(session.config.option.basetemp or tempfile.gettempdir())
    while not os.path.isdir(folder):  # --basetemp is created later; its disk is its nearest parent's
        folder = os.path.dirname(folder)
    problem = free_disk_problem(folder)
    if problem:
        pytest.exit(problem, returncode=1)
