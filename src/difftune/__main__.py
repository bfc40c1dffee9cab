"""``python -m difftune`` is the ``difftune`` command (the benchmark runs its configurations this way)."""

import sys

from difftune.cli import main

sys.exit(main())
