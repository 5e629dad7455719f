"""Package structure: imports point one way, paths -> fields -> samplers -> couplings / likelihood -> losses -> models /
training -> evaluation;
the mathematical core imports neither Flax, optax, orbax nor data code; the library never imports `experiments`."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxgen"

# Each subpackage (or module) of jaxgen, with its level: a module may import jaxgen modules of lower levels and its
# own subpackage only. Levels 0-5 are the mathematical core.
LEVELS = {
    "_checks": 0,
    "paths": 1,
    "fields": 2,
    "samplers": 3, "metrics": 3, "oracle": 3,
    "couplings": 4, "likelihood": 4, "inverse": 4,
    "losses": 5,
    "models": 6, "data": 6,
    "training": 7,
    "evaluation": 8,
}
CORE_LEVEL = 5
ROOT_LEVEL = 5.5  # `import jaxgen` (its __init__ gathers the core)
# third-party packages the core must not import: networks, optimizers, checkpoints, data loading
FORBIDDEN_IN_CORE = ("flax", "optax", "orbax", "tensorflow_datasets", "tensorflow", "grain", "sklearn", "torch",
                     "tensorboardX", "matplotlib", "tqdm")


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    """Every module a file imports, at any depth of the file (lazy imports inside functions count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside the package
                continue
            yield node.lineno, node.module or ""


def test_every_module_has_a_level():
    units = {_unit(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}
    assert units <= set(LEVELS), f"add new subpackages to LEVELS with their place in the import order: {units - set(LEVELS)}"


def test_imports_point_one_way():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":
            continue
        unit = _unit(path)
        level = LEVELS[unit]
        for line, name in _imports(path):
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
            top = name.split(".")[0]
            if top == "experiments":
                violations.append(f"{where}: the library never imports the experiments")
            elif top == "jaxgen":
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else None
                target_level = ROOT_LEVEL if target is None else LEVELS.get(target)
                if target_level is None:
                    violations.append(f"{where}: unknown subpackage")
                elif target != unit and target_level >= level:
                    violations.append(f"{where}: level {level} ({unit}) may only import lower levels")
            elif level <= CORE_LEVEL and top in FORBIDDEN_IN_CORE:
                violations.append(f"{where}: the mathematical core does not import {top}")
    assert not violations, "\n".join(violations)


def test_the_core_imports_no_flax_optax_orbax_or_data_code():
    core = [name for name, level in LEVELS.items() if level <= CORE_LEVEL and not name.startswith("_")]
    code = ("import sys, jaxgen\n"
            + "".join(f"import jaxgen.{name}\n" for name in core)
            + f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_CORE!r}\n"
              "       or m.split('.')[0] == 'experiments'\n"
              "       or m.startswith(('jaxgen.models', 'jaxgen.training', 'jaxgen.data', 'jaxgen.evaluation'))]\n"
              "assert not bad, sorted(bad)[:20]\n")
    subprocess.run([sys.executable, "-c", code], check=True)
