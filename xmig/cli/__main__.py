"""``python -m xmig.cli``: the ``xmig`` command."""

import sys

from xmig.cli import main

sys.exit(main())
