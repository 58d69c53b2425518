# SPDX-License-Identifier: Apache-2.0
"""Finds the factorllm package for the repository's own Python scripts (the fine-tuning recipe, the train-step
benchmark, the torch-op tests), so that they run from a checkout without an install.

The package is taken from PYTHONPATH or an installed copy first; failing that, from the most recently built
<repo>/build*/python (the build tree's package, python/CMakeLists.txt). This file is not part of the package: it is
what finds the package.
"""
import glob
import os
import sys


def import_factorllm_torch(repo):
    """Returns the module factorllm.torch, importing it as described above; raises ImportError if no build has it."""
    try:
        import factorllm.torch as ops
    except ImportError:
        found = sorted(glob.glob(os.path.join(repo, "build*", "python", "factorllm", "__init__.py")), key=os.path.getmtime,
                       reverse=True)
        if not found:
            raise
        sys.path.insert(0, os.path.dirname(os.path.dirname(found[0])))
        import factorllm.torch as ops
    return ops
