"""The environment defaults processes set before gRPC and torch load: set only where the operator
chose nothing, a group at a time."""

from __future__ import annotations

import os

import pytest

from loraplex.tools.runtime_env import DEFAULTS, missing_defaults

NAMES = [name for group in DEFAULTS for name in group]


@pytest.fixture
def clean_environment(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def test_every_default_applies_to_an_empty_environment(clean_environment):
    assert missing_defaults() == {
        "GRPC_ENABLE_FORK_SUPPORT": "false",
        "OMP_WAIT_POLICY": "ACTIVE",
        "GOMP_SPINCOUNT": "300000",
    }


@pytest.mark.parametrize("operator_choice", [("OMP_WAIT_POLICY", "PASSIVE"), ("GOMP_SPINCOUNT", "0")])
def test_an_operator_openmp_choice_keeps_out_the_whole_openmp_group(
    clean_environment, monkeypatch, operator_choice
):
    monkeypatch.setenv(*operator_choice)
    assert missing_defaults() == {"GRPC_ENABLE_FORK_SUPPORT": "false"}


def test_this_test_process_runs_with_the_defaults_or_the_operator_values():
    """conftest applied them before torch loaded: every name is set, whoever set it."""
    assert all(name in os.environ for name in NAMES)
