#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ are installed, running and reachable on
# 127.0.0.1 the way config/outboxd.toml and the tests expect:
#   PostgreSQL on 5432, role "root" (superuser, trust auth on loopback)
#   wal_level = logical (for capture = "wal" sources; set once, with a restart)
#   RabbitMQ on 5672, guest/guest
# Installs them with apt-get if they are missing (Debian). Meant for a
# development machine or CI, not for production hosts.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  log "gave up waiting for $what after ${limit}s"; return 1
}
apt_install() {
  log "installing $* with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fi
  if ! port_open 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_for 60 "PostgreSQL on 5432" port_open 5432
  if ! psql -h 127.0.0.1 -U root -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    # A fresh Debian install: create the role and trust loopback (dev only).
    log "creating role root and trusting loopback connections (development setup)"
    as_root su postgres -c "createuser --superuser root" 2>/dev/null || true
    as_root su postgres -c "createdb --owner root root" 2>/dev/null || true
    local hba
    hba=$(as_root su postgres -c "psql -Atc 'show hba_file'")
    if ! as_root grep -q '# outboxd dev' "$hba"; then
      as_root sed -i "1i host all all 127.0.0.1/32 trust # outboxd dev\nhost all all ::1/128 trust # outboxd dev" "$hba"
      as_root su postgres -c "psql -Atc 'select pg_reload_conf()'" >/dev/null
    fi
  fi
  wait_for 30 "PostgreSQL login as root" psql -h 127.0.0.1 -U root -d postgres -Atc 'select 1'
  log "PostgreSQL is up"
}

# capture = "wal" sources (and their tests) read the write-ahead log
# through a logical replication slot, which needs wal_level = logical. The
# setting takes a restart; done once, and said.
ensure_wal_level_logical() {
  local level
  level=$(psql -h 127.0.0.1 -U root -d postgres -Atc 'show wal_level')
  if [ "$level" = logical ]; then return 0; fi
  log "wal_level is $level; setting wal_level = logical (ALTER SYSTEM) and restarting PostgreSQL"
  psql -h 127.0.0.1 -U root -d postgres -qc 'ALTER SYSTEM SET wal_level = logical'
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  wait_for 60 "PostgreSQL login as root" psql -h 127.0.0.1 -U root -d postgres -Atc 'select 1'
  level=$(psql -h 127.0.0.1 -U root -d postgres -Atc 'show wal_level')
  if [ "$level" != logical ]; then log "wal_level is still $level after the restart"; return 1; fi
  log "PostgreSQL restarted with wal_level = logical"
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
  fi
  wait_for 120 "RabbitMQ on 5672" port_open 5672
  as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  log "RabbitMQ is up"
}

ensure_postgres
ensure_wal_level_logical
ensure_rabbitmq
