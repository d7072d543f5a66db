"""``python -m fedit``: the same as the ``fedit`` command."""

import sys

from fedit.cli.main import main

sys.exit(main())
