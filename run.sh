#!/usr/bin/env bash
# The main job: sets up the environment if needed, then trains and samples the default experiment
# (2-D flow matching, 8 Gaussians -> moons) on embedded data. Extra arguments go to the experiment,
# e.g. ./run.sh --out runs/toy2d --steps 20000. See README.md.
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$JAXGEN_ROOT"
exec "$PY" -m experiments.toy2d "$@"
