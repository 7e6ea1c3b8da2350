"""`python -m deltatune.cli` and `accelerate launch -m deltatune.cli train ...` run the `deltatune` command."""

import sys

from . import main

sys.exit(main())
