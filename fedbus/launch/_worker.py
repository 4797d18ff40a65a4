"""Entry point of a worker process: ``python -m fedbus.launch._worker SPEC.json``.

Separate from `fedbus.launch.workers` because the package imports that module
(through `fedbus.launch.federation`): running it with ``-m`` would load it twice.
"""

import sys

from fedbus.launch.workers import main

if __name__ == "__main__":
    sys.exit(main())
