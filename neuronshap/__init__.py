"""The ``neuronshap`` command, its HTTP client, and the service assembled as a process runs it.

This package sits on top: it may import ``app`` (the API) and ``worker`` (the
runner and the estimator), which never import it. Torch is imported only by
the commands that run the estimator.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuronshap")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
