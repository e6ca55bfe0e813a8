"""Fixtures of the fault suite: the tiny store and split and one finished one-epoch run that training tests
copy and damage (never change it in place); a store holding one stack for the bad-input suites."""

from __future__ import annotations

import shutil

import pytest

from stacktrain.train import loop
from tests.faults import input_makers as mk
from tests.support import tiny_config, tiny_data

ONE_EPOCH = "train.epochs=1"


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("fault-data"))


@pytest.fixture(scope="session")
def finished_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fault-run") / "run"
    loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_dir)
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A fresh copy of the finished run, to damage or resume."""
    return shutil.copytree(finished_run, tmp_path / "run")


# -- a store that already holds one stack, for the bad-input suites (input_makers.py) ---------------------
@pytest.fixture(scope="module")
def prior_store(tmp_path_factory):
    return mk.prior_store(tmp_path_factory.mktemp("prior"))


@pytest.fixture
def store(prior_store, tmp_path):
    """A fresh copy of the prior store for a test that writes into it."""
    return mk.copy_store(prior_store, tmp_path)
