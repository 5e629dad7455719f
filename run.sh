#!/usr/bin/env bash
# The main job: sets up the environment if needed, then trains class-conditional flow matching with
# classifier-free guidance on the embedded digits and writes samples, a guidance sweep, the loss curve
# and an evaluation report (see README.md). Extra arguments go to `jaxgen train digits_cfm`, e.g.
#   ./run.sh --out runs/mine --set steps=2000
# `./run.sh toy2d [ARGS]` runs the 2-D experiment instead (`jaxgen train toy2d_8gaussians_to_moons`, 8 Gaussians ->
# moons, output in runs/toy2d).
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$JAXGEN_ROOT"
if [[ "${1:-}" == "toy2d" ]]; then
  shift
  exec "$PY" -m experiments train toy2d_8gaussians_to_moons --out runs/toy2d "$@"
fi
exec "$PY" -m experiments train digits_cfm "$@"
