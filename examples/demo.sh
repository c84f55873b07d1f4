#!/bin/sh
# Set everything up, then run a live demo of two nodes replicating on loopback.
set -eu
cd "$(dirname "$0")/.."
./packaging/dev-setup.sh
exec .venv/bin/python examples/demo.py
