"""``python -m experiments``: the ``jaxgen`` command line (:mod:`experiments.cli`)."""

import sys

from experiments.cli import main

sys.exit(main())
