"""sae-harness: how badly does a sparse autoencoder damage the model it is spliced into?

The package is a set of small modules (see docs/design.md for the layout and data flow);
importing it loads nothing heavy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-harness")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"
