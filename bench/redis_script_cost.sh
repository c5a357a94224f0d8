#!/usr/bin/env bash
# Redis-side cost of two Lua scripts (see redis_script_cost.py); installs the Python
# Redis client into a virtualenv under target/ the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'redis>=5,<8'
fi
exec "$venv/bin/python" bench/redis_script_cost.py "$@"
