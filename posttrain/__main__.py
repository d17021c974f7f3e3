"""``python -m posttrain`` (what torchrun launches): the same CLI."""

import sys

from posttrain.cli import main

sys.exit(main())
