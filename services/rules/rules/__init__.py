"""Rules service: turns purchases and engagement into points commands."""

from shared.native import overlay

# The engine and the batch code run compiled when `make native` built them from these very sources.
__path__ = overlay(__name__, __path__)
