"""``python -m echfront.cli``: the same as the ``echfront`` command."""

import sys

from echfront.cli.main import main

sys.exit(main())
