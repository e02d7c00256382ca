"""Print the files a bare Python needs to run ``nbdswap attach`` (for the VM image).

Run with the guest's interpreter (Debian's python3), ``-S`` and PYTHONPATH set to
the repository: prints ``sys PATH`` for the interpreter, every standard-library
module and extension it loaded, and ``pkg RELATIVE_PATH`` for nbdswap's own files.
"""

import encodings.idna  # noqa: F401  (getaddrinfo encodes host names with it)
import os
import runpy  # noqa: F401  (python -m runs the CLI through it)
import sys

import nbdswap.attach  # noqa: F401  (the modules attach needs at run time)
import nbdswap.cli

nbdswap.cli.build_parser()
repository = os.path.dirname(os.path.dirname(os.path.abspath(nbdswap.__file__)))
print("sys", os.path.realpath(sys.executable))
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    path = os.path.abspath(path)
    if path.startswith(os.path.join(repository, "nbdswap") + os.sep):
        print("pkg", os.path.relpath(path, repository))
    elif path.startswith(repository + os.sep):
        continue  # this script
    else:
        print("sys", path)
