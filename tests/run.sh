#!/bin/sh
# Set everything up and run the whole test suite: lint, types, unit and
# end-to-end tests (real daemons, sockets, files, network namespaces).
# Extra arguments go to pytest, e.g.  ./tests/run.sh -k resume  or  ./tests/run.sh tests/unit
set -eu
cd "$(dirname "$0")/.."
./packaging/dev-setup.sh
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/python -m pytest -q "$@"
