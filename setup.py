"""The wheel's build (the image's): with LOYALTY_MYPYC=1, the modules pyproject.toml lists under
[tool.loyalty] mypyc are compiled into it by mypyc (shared/native.py). Everything else is in pyproject.toml."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shared.native import extensions  # the list's reader, from this tree

setup(ext_modules=extensions() if os.environ.get("LOYALTY_MYPYC") == "1" else [])
