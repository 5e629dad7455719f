"""Test-wide settings, applied before JAX starts its backend (and inherited by the commands tests start):

- the `jaxgen` command's persistent compilation cache stays off, so that tests neither write to the user's cache nor
  depend on what an earlier run left there;
- XLA compiles for the CPU without LLVM's optimisation passes (``--xla_backend_optimization_level=0``): the tests are
  dominated by compilation, which this makes about twice as fast (the fast tier 3m29s -> 2m35s, the full suite 17m29s
  -> 14m16s on 2 cores), while the compiled programs compute the same IEEE operations, only more slowly. A level
  already in ``XLA_FLAGS`` is kept (``XLA_FLAGS=--xla_backend_optimization_level=2 ./test.sh`` tests optimised code).
"""

import os

os.environ.setdefault("JAXGEN_COMPILATION_CACHE", "0")

TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAG).strip()
