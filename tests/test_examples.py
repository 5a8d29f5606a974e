"""The README's example of an estimator in a model of one's own (examples/hard_routing.py) runs and
learns, with a pathwise and an unbiased estimator, so the example cannot rot."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO


def load_example():
    spec = importlib.util.spec_from_file_location("hard_routing", REPO / "examples" / "hard_routing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("estimator", ["st_gumbel", "rloo"])
def test_the_routing_example_learns_to_route(estimator, capsys):
    """A single linear expert leaves a held-out squared error of 9.3 on this data (least squares); the
    router must learn to send each cluster to its own expert to get far below it."""
    example = load_example()
    errors = example.main(["--estimator", estimator, "--steps", "600"])
    assert errors[0] > 20 and errors[-1] < 2.0, errors
    assert f"{estimator}: step 600, held-out squared error" in capsys.readouterr().out


def test_the_example_is_reproducible_from_its_seed():
    example = load_example()
    assert example.train("rloo", steps=50, log_every=50) == example.train("rloo", steps=50, log_every=50)
