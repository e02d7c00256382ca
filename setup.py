"""The C part of nbdswap: the slab allocator's bookkeeping (nbdswap/tiers/_slab.c).

Everything else is declared in pyproject.toml; setuptools reads extension modules only
from here.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nbdswap.tiers._slab", ["nbdswap/tiers/_slab.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
