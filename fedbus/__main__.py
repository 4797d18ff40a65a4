"""``python -m fedbus``: the same as the ``fedbus`` console script."""

import sys

from fedbus.cli import main

sys.exit(main())
