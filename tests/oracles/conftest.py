"""Suites generated once per test session (the default suite takes seconds)."""

import os
import time

import pytest

from oracles.authoring import writer

from oracles.format import golden


@pytest.fixture(scope="session")
def default_suite(tmp_path_factory):
    """(path, seconds to generate) of the default suite."""
    out = os.path.join(tmp_path_factory.mktemp("golden"), "default")
    t = time.perf_counter()
    writer.generate(out, "default")
    return out, time.perf_counter() - t


@pytest.fixture(scope="session")
def default_dir(default_suite):
    return default_suite[0]


@pytest.fixture(scope="session")
def default_golden(default_dir):
    """The default suite opened (manifest validated, every file's sha256 verified) once: opening
    it takes a quarter of a second, and a test that judges many candidates or profiles against it
    passes this to check_suite/run_check instead of the path (what a suite's opening checks is
    tested on their own in test_golden.py and test_untrusted.py)."""
    return golden.Golden(default_dir)


@pytest.fixture(scope="session")
def conventions_dir(tmp_path_factory):
    out = os.path.join(tmp_path_factory.mktemp("golden"), "conventions")
    writer.generate(out, "conventions")
    return out
