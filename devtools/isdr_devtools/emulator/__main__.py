"""`python -m isdr_devtools.emulator`: run the InferenceServer emulator."""

import sys

from .cli import main

sys.exit(main())
