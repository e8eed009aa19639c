#!/usr/bin/env bash
# The benchmark: builds outboxd and outboxd-bench in release mode and runs
# the bench against the local PostgreSQL and RabbitMQ (started if needed).
# Arguments go to outboxd-bench (--quick, --repeats N, --rows N, --only ...),
# except --pin, which this script handles:
#
#   --pin   RabbitMQ gets CPU 0 to itself; PostgreSQL, the bench and the
#           relays it starts share the other CPUs. On a small machine the
#           broker otherwise shares its cores with them, and its rate
#           follows the CPU it gets; pinned, the drains' "broker_cores"
#           says how much of its own core the broker had work for. The
#           affinities are put back to every CPU when the bench ends.
set -euo pipefail
cd "$(dirname "$0")/.."

pin=false
args=()
for a in "$@"; do
  if [ "$a" = --pin ]; then pin=true; else args+=("$a"); fi
done

scripts/services.sh
# Both packages of the workspace: the bench (bench/) runs the outboxd next
# to it in target/release (or $CARGO_TARGET_DIR/release).
cargo build --release --locked -p outboxd -p outboxd-bench
bench="${CARGO_TARGET_DIR:-target}/release/outboxd-bench"

if ! $pin; then
  exec "$bench" "${args[@]}"
fi

cpus=$(nproc)
if [ "$cpus" -lt 2 ]; then
  echo "bench: --pin needs at least 2 CPUs, this machine has $cpus" >&2
  exit 2
fi
all="0-$((cpus - 1))"
# As taskset prints a list: "1" on 2 CPUs, "1-3" on 4.
if [ "$cpus" -eq 2 ]; then rest=1; else rest="1-$((cpus - 1))"; fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Every thread of each process; a process gone meanwhile is no error.
set_affinity() { # set_affinity CPUS PID...
  local cpus=$1 pid; shift
  for pid in "$@"; do as_root taskset -apc "$cpus" "$pid" >/dev/null 2>&1 || true; done
}
# The CPUs a process may run on, as taskset prints them ("0", "1-3").
affinity() { taskset -pc "$1" 2>/dev/null | sed 's/.*: //'; }
broker_pids() { pgrep -f 'beam.smp' || true; }
# PostgreSQL's postmaster and every backend: new backends inherit the
# postmaster's affinity.
postgres_pids() { pgrep -x postgres || true; }
unpin() {
  # shellcheck disable=SC2046
  set_affinity "$all" $(broker_pids) $(postgres_pids)
  echo "bench: RabbitMQ and PostgreSQL may use CPUs $all again" >&2
}
trap unpin EXIT
# shellcheck disable=SC2046
set_affinity 0 $(broker_pids)
# shellcheck disable=SC2046
set_affinity "$rest" $(postgres_pids)
# A run that only claims to be pinned would mislead: check both took.
broker=$(broker_pids | head -n 1)
postmaster=$(pgrep -o -x postgres || true)
if [ -z "$broker" ] || [ -z "$postmaster" ] || [ "$(affinity "$broker")" != 0 ] ||
  [ "$(affinity "$postmaster")" != "$rest" ]; then
  echo "bench: --pin could not pin RabbitMQ (pid ${broker:-none}) and PostgreSQL (pid ${postmaster:-none}); are they local, and may this user change their CPU affinity?" >&2
  exit 2
fi
echo "bench: pinned RabbitMQ to CPU 0, PostgreSQL and the bench to CPUs $rest" >&2
taskset -c "$rest" "$bench" "${args[@]}"
