"""``python -m deconvcuda visualize ...``: the same as the ``deconvcuda`` console script."""
import sys

from .cli import main

sys.exit(main())
