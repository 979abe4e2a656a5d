"""``python -m falflow``: the ``falflow`` command."""

import sys

from falflow.cli import main

sys.exit(main())
