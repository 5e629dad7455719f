"""Package structure: the mathematical core imports neither Flax nor data loading."""

import subprocess
import sys


def test_core_imports_no_flax_or_tfds():
    code = ("import sys, jaxgen, jaxgen.paths, jaxgen.fields, jaxgen.losses, jaxgen.samplers, jaxgen.oracle, "
            "jaxgen.metrics; bad = [m for m in ('flax', 'tensorflow_datasets', 'optax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
