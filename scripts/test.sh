#!/usr/bin/env bash
# The test command: install everything (scripts/bootstrap.sh), lint, then run the whole suite.
# Slow real-model tests are included; deselect them locally with: scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check compiler passes targets tests
.venv/bin/ruff format --check compiler passes targets tests
.venv/bin/python -m pytest "$@"
