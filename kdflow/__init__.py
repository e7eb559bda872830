"""kdflow: reproducible knowledge distillation on CIFAR-10/100 and image folders.

The library never imports Snakemake: the workflow's scripts unpack
`snakemake.input/params/output` and call plain functions from here, so every
step can also be run and tested from Python.
"""

__version__ = "0.1.0"


class KdflowError(Exception):
    """A problem with the user's input or data, stated with its fix.

    Scripts print these as one clear message instead of a traceback.
    """
