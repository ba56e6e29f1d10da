"""``python -m hf_layercache.cli``: the ``hf-layercache`` command."""

import sys

from . import main

sys.exit(main())
