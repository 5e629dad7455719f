"""Test-wide settings: the `jaxgen` command's persistent compilation cache stays off in tests (and in the commands
they start), so that tests neither write to the user's cache nor depend on what an earlier run left there."""

import os

os.environ.setdefault("JAXGEN_COMPILATION_CACHE", "0")
