"""Shared pytest configuration.

Triton decides at kernel-decoration time whether to compile or interpret, so the
interpreter switch must be in the environment before anything imports triton
(nrrdd.kernels included): set it here, at import of the conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
