"""``python -m neuronshap``: the same as the ``neuronshap`` command."""

import sys

from neuronshap.cli import main

sys.exit(main())
