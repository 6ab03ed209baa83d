#!/usr/bin/env bash
# The one entry point: hands every argument to the harness CLI (harness/cli.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m harness "$@"
