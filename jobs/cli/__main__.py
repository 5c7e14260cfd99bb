"""`python -m jobs.cli`: the `fuxi` command."""

import sys

from jobs.cli import main

sys.exit(main())
