#!/usr/bin/env bash
# The shop demo (examples/shop) on the local PostgreSQL and RabbitMQ
# (installed and started if needed): orders, payments and inventory, each
# with its own database, joined by one outboxd with three sources.
#
# It creates the databases shop_orders, shop_payments and shop_inventory
# (dropping earlier ones), migrates their outboxes, declares the exchange
# shop.events and the queues shop.orders, shop.payments, shop.inventory,
# starts outboxd and the three services, places ORDERS orders (default
# 300) with a kill -9 of outboxd halfway, waits until every order is
# settled, prints the summary and the reconciliation, then breaks one
# order by hand to show reconciliation finding it, and puts it back.
# Everything it started is stopped at the end, also on failure; the logs
# stay in a temporary directory, printed last.
#
# The services hand every 25th message back to the broker after committing
# it instead of acking it (`shop serve --lose-ack-every 25`), as a consumer
# that dies between commit and ack would: the summary shows the inboxes
# dropping those redeliveries, and any the kill -9 caused.
set -euo pipefail
cd "$(dirname "$0")/.."

ORDERS=${ORDERS:-300}
export SHOP_PREFIX=${SHOP_PREFIX:-shop}
config=examples/shop/outboxd.toml
bin=${CARGO_TARGET_DIR:-target}/debug
logs=$(mktemp -d "${TMPDIR:-/tmp}/shop-demo.XXXXXX")
pids=()
relay=

say() { printf '\n== %s\n' "$*"; }
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  local rc=$?
  trap - EXIT
  stop_all
  echo "logs: $logs" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts outboxd and waits (at most 30 s) until it says it is running.
start_relay() {
  local before
  before=$(grep -c 'outboxd running' "$logs/outboxd.log" 2>/dev/null || true)
  "$bin/outboxd" run -c "$config" >>"$logs/outboxd.log" 2>&1 &
  relay=$!
  pids+=("$relay")
  for _ in $(seq 300); do
    if [ "$(grep -c 'outboxd running' "$logs/outboxd.log" || true)" -gt "${before:-0}" ]; then
      return 0
    fi
    if ! kill -0 "$relay" 2>/dev/null; then
      echo "outboxd exited; its log:" >&2
      tail -n 20 "$logs/outboxd.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "outboxd did not start within 30s" >&2
  return 1
}

kill9_relay() {
  kill -KILL "$relay"
  wait "$relay" 2>/dev/null || true
  local pid kept=()
  for pid in "${pids[@]}"; do [ "$pid" = "$relay" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
}

orders_sql() { psql -h 127.0.0.1 -U root -d "${SHOP_PREFIX}_orders" -Atqc "$1"; }

scripts/services.sh
say "building outboxd and the shop example (debug; the first build takes a few minutes)"
cargo build --locked --bin outboxd --example shop
shop=$bin/examples/shop

say "setting up: databases, tables, inboxes, outboxes, exchange and queues"
"$shop" setup
"$bin/outboxd" migrate -c "$config" 2>>"$logs/migrate.log"
"$shop" declare
"$bin/outboxd" check -c "$config" >"$logs/check.log" 2>&1 || { cat "$logs/check.log" >&2; exit 1; }
echo "outboxd check: ok ($config, 3 sources)"

say "starting outboxd and the services (logs in $logs)"
start_relay
for service in orders payments inventory; do
  "$shop" serve "$service" --lose-ack-every 25 >"$logs/$service.log" 2>&1 &
  pids+=("$!")
done

first=$((ORDERS / 2))
say "placing $ORDERS orders, with a kill -9 of outboxd after the first $first"
"$shop" place --orders "$first" --seed 1
echo "kill -9 outboxd (pid $relay), then start it again"
kill9_relay
start_relay
"$shop" place --orders "$((ORDERS - first))" --seed 2

say "waiting for every order to settle"
"$shop" wait --timeout 120s

say "summary"
"$shop" summary
handed_back=$(cat "$logs/orders.log" "$logs/payments.log" "$logs/inventory.log" | grep -c 'demo fault' || true)
echo "                     of those, $handed_back were handed back on purpose after commit (--lose-ack-every 25);"
echo "                     the others are copies outboxd sent again after its kill -9"
"$shop" reconcile

broken=$(orders_sql "SELECT id FROM orders WHERE reason = 'out_of_stock' ORDER BY id LIMIT 1")
if [ -n "$broken" ]; then
  say "breaking order $broken by hand: cancelled (out of stock) -> confirmed"
  orders_sql "UPDATE orders SET status = 'confirmed', reason = NULL WHERE id = '$broken'"
  if "$shop" reconcile; then
    echo "reconciliation missed the broken order $broken" >&2
    exit 1
  fi
  orders_sql "UPDATE orders SET status = 'cancelled', reason = 'out_of_stock' WHERE id = '$broken'"
  echo "put back:"
  "$shop" reconcile
fi

say "stopping"
stop_all
echo "done; the databases ${SHOP_PREFIX}_* and queues ${SHOP_PREFIX}.* stay for a look (psql, rabbitmqctl)"
