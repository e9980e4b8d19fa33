"""gemmaq's entry points: the `gemmaq` command and the one-command dev stack."""

from core import __version__

__all__ = ["__version__"]
