"""`python -m histosam.backend.cli` runs the `histosam` command."""

import sys

from histosam.backend.cli import main

sys.exit(main())
