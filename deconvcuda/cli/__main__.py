"""``python -m deconvcuda.cli ...``: the same as ``python -m deconvcuda ...``."""
import sys

from . import main

sys.exit(main())
