"""``python -m condi_models.predict ...``: the predict command outside the umbrella CLI."""

import sys

from condi_models.predict.cli import main

sys.exit(main())
