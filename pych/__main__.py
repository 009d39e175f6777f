"""``python -m pych`` is the ``pych`` command."""

import sys

from pych.cli.main import main

sys.exit(main())
