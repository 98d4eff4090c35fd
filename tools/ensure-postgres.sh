#!/usr/bin/env bash
# The tests start a real PostgreSQL from Debian's packages; install it when missing.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL server binaries are missing; run: sudo apt-get install -y postgresql" >&2
  exit 1
fi
echo "installing Debian's postgresql for the tests..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
