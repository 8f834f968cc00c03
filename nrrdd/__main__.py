"""``python -m nrrdd`` (and ``torchrun ... -m nrrdd``): the command line."""
import sys

from .cli import main

sys.exit(main())
