#!/usr/bin/env bash
# Make sure Prometheus' `prometheus` and `promtool` are installed (Debian's
# `prometheus` package) for the monitoring tests: the alert rules' unit
# tests, `promtool check metrics` on a real scrape, and a real Prometheus
# scraping a relay (tests/integration/monitoring.rs), which each test starts
# itself on a free loopback port.
#
# The package's maintainer scripts would start a system-wide Prometheus on
# :9090. The tests never use it, so it is installed without starting one (a
# policy-rc.d that forbids service starts, kept only for the install, if
# the machine has none), and its service is disabled. Meant for a
# development machine or CI, like services.sh.
set -euo pipefail

log() { printf 'prometheus: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  log "already installed ($(prometheus --version 2>&1 | head -n 1))"
  exit 0
fi

policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
  log "forbidding service starts during the install ($policy, removed afterwards)"
  printf '#!/bin/sh\n# outboxd scripts/prometheus.sh: no service starts during an install\nexit 101\n' |
    as_root tee "$policy" >/dev/null
  as_root chmod 755 "$policy"
  made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then as_root rm -f "$policy"; fi; }
trap cleanup EXIT

log "installing the prometheus package with apt-get (prometheus, promtool)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

# Nor at boot: the package enables its service. `systemctl disable` works
# without a running systemd (as in a container); update-rc.d covers SysV init.
if command -v systemctl >/dev/null; then
  as_root systemctl disable prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ] && command -v update-rc.d >/dev/null; then
  as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
log "installed $(prometheus --version 2>&1 | head -n 1); its system service was not started and is disabled"
