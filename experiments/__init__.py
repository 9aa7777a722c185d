"""The commands (`python -m experiments.<name>`): the sweep, its report, the probes and the benchmarks.

`python -m` puts the current folder first on sys.path. From a checkout's root, its top-level kernels/ folder
(installed as rosa2_jax.kernels) would then shadow the PyPI package `kernels`, which transformers imports when it
reads a model's config.json. The checkout is installed (`pip install -e .`), so the commands drop its root from
the path before anything imports transformers.
"""

import os
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _CHECKOUT]
