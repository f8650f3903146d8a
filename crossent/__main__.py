"""``python -m crossent``: the same command as the ``crossent`` script."""
import sys

from .cli import main

sys.exit(main())
