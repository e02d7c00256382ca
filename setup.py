"""The C part of nbdswap: the slab allocator's bookkeeping (nbdswap/tiers/_slab.c).

Everything else is declared in pyproject.toml; setuptools reads extension modules only
from here.  The extension carries its source's SHA-256, so the tests can refuse a build
of another version of the source (tests/conftest.py).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "nbdswap/tiers/_slab.c"
DIGEST = hashlib.sha256(Path(__file__).parent.joinpath(SOURCE).read_bytes()).hexdigest()

setup(ext_modules=[Extension("nbdswap.tiers._slab", [SOURCE], extra_compile_args=["-O2", "-Wall", "-Wextra"],
                             define_macros=[("SOURCE_SHA256", f'"{DIGEST}"')])])
