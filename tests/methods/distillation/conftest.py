"""Shared fixtures of the distillation tests."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs a test in float64 and restores the previous setting afterwards."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
