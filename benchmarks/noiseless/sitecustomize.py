"""The "noise 0" cells of benchmarks/privacy_utility.py: the private recipe run exactly as it runs
privately (same Poisson sampling, same clipping, same accounting, same secure aggregation), with
every DP noise sample zero, so that what privacy costs is measured against its own recipe.

Python imports `sitecustomize` at start-up from the path; the benchmark puts this folder first on
PYTHONPATH for its own `fedmoe run`, and every process of that run inherits it (the launcher, the
SuperLink, the simulation engine, Ray's workers that run the nodes). When one of them imports
fedmoe's noise samplers, they are replaced by zeros, and each process that drew "noise" leaves a
file named by its pid in $FEDMOE_NOISELESS_MARKS, so that the benchmark can check the patch
reached the nodes. The product itself has no switch that turns noise off: a coordinator cannot ask
for it, and this folder is on no user's path.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

SAMPLERS = "fedmoe.privacy.mechanisms"


def zero_noise(n: int, *_args, **_kwargs) -> np.ndarray:
    """Stands in for gaussian_noise and laplace_share_noise: n zeros, and a mark of the call."""
    marks = os.environ.get("FEDMOE_NOISELESS_MARKS")
    if marks:
        Path(marks, str(os.getpid())).touch()
    return np.zeros(n)


class ZeroNoiseFinder(importlib.abc.MetaPathFinder):
    """Finds the samplers' module as Python would, then zeroes its noise functions as soon as it
    has run (before any other module imports them by name)."""

    def find_spec(self, name, path, target=None):
        if name != SAMPLERS:
            return None
        sys.meta_path.remove(self)  # the real spec, from the finders after this one
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run_module = spec.loader.exec_module

        def run_then_zero(module):
            run_module(module)
            module.gaussian_noise = zero_noise
            module.laplace_share_noise = zero_noise

        spec.loader.exec_module = run_then_zero
        return spec


sys.meta_path.insert(0, ZeroNoiseFinder())
