"""``python -m docev.cli``: the ``docev`` console script."""

import sys

from docev.cli import main

sys.exit(main())
