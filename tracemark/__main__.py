"""``python -m tracemark ...``: the same as the ``tracemark`` command."""

import sys

from .cli import main

sys.exit(main())
