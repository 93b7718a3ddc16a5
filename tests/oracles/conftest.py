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
def conventions_dir(tmp_path_factory):
    out = os.path.join(tmp_path_factory.mktemp("golden"), "conventions")
    writer.generate(out, "conventions")
    return out
