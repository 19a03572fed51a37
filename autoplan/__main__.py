"""`python -m autoplan` is the `autoplan` command."""

import sys

from autoplan.app.cli import main

sys.exit(main())
