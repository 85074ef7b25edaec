import sys

from .shop import main

sys.exit(main())
