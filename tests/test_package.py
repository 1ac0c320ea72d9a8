"""The Python API: every verb reachable from ``colbertkit`` without the CLI."""

from __future__ import annotations

import importlib

import pytest

import colbertkit


@pytest.mark.parametrize("name", [n for n in colbertkit.__all__ if n != "__version__"])
def test_public_names_resolve_to_their_modules(name):
    value = getattr(colbertkit, name)
    module = importlib.import_module(colbertkit._LAZY[name])
    assert value is getattr(module, name)


def test_the_four_verbs_are_there():
    for verb in ("validate_dataset", "train", "score_pairs", "export_model"):
        assert callable(getattr(colbertkit, verb))


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = colbertkit.nope
