"""Fixtures only; shared functions and references live in helpers.py."""

from __future__ import annotations

import pytest

from mergekit_partition_slerp.family import Shape, build_family


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """base + donor0..donor3: tiny 8-layer Mistral checkpoints, built once per session."""
    root = tmp_path_factory.mktemp("family")
    return build_family(str(root), donors=4, shape=Shape(num_hidden_layers=8), seed=3)
