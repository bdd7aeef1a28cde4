# Fixtures shared by several test folders.
pytest_plugins = ["tests.support.s3", "tests.support.image"]
