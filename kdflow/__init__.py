"""kdflow: reproducible knowledge distillation on CIFAR-10/100 and image folders.

The library never imports Snakemake: the workflow's scripts unpack
`snakemake.input/params/output` and call plain functions from here, so every
step can also be run and tested from Python.
"""

__version__ = "0.1.0"

# The library's subpackages in the workflow's order. A module imports only
# from its own subpackage and from earlier ones (tests/test_imports.py), so
# each stage can be read, tested and reused without the ones after it.
STAGES = ("core", "data", "models", "distill", "study", "train", "deploy", "analysis", "workflow")


class KdflowError(Exception):
    """A problem with the user's input or data, stated with its fix.

    Scripts print these as one clear message instead of a traceback.
    """
