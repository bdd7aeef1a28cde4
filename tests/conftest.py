# Fixtures shared by several test folders.
import os

pytest_plugins = ["tests.support.s3", "tests.support.image"]

# The relay serves metrics on METRICS_PORT (9120 unless told otherwise). Tests run many relays at
# once, beside other test runs on the same machine: their processes serve none unless a test
# gives them a port of their own (chosen by the OS).
os.environ.setdefault("METRICS_PORT", "0")
