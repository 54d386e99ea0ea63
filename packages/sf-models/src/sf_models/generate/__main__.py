"""``python -m sf_models.generate ...`` (e.g. under torchrun): ``streamfusion generate ...``."""

import sys

from ..cli import main

sys.exit(main(["generate", *sys.argv[1:]]))
