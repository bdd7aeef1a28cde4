"""`python -m relay.emulator`: run the InferenceServer emulator."""

import sys

from .cli import main

sys.exit(main())
