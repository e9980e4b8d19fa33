#!/usr/bin/env bash
# Fills build/wheelhouse with every wheel the two images install: pyproject.toml's dependencies,
# its worker extra, torch and torchvision at the versions deploy/images/constraints.txt pins, and the build
# backend. `pip wheel` builds any sdist here, so the images need no compiler and no network:
#
#   deploy/images/wheelhouse.sh && docker build --network none --build-arg WHEELHOUSE_ONLY=1 ...
#
# (`make images` does both.) Wheels are for this host's Python and platform: run it on the
# architecture, and with the Python minor version, of the images' base.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
out=${WHEELHOUSE:-build/wheelhouse}
mkdir -p "$out"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PYTHON" - >"$reqs" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
pins = [line for line in open("deploy/images/constraints.txt") if not line.startswith("#")]
lines = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["worker"]
lines += project["build-system"]["requires"] + [p.strip() for p in pins if p.strip()]
# redis needs async-timeout below Python 3.11.3 (Debian bookworm's python3.11 is 3.11.2).
lines += ["async-timeout>=4.0.3"]
print("\n".join(lines))
PY
"$PYTHON" -m pip wheel --quiet --wheel-dir "$out" -r "$reqs"
echo "$out: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1)"
