#!/bin/sh
# A private RabbitMQ cluster on loopback, for tests: never the shared broker.
#
#   scripts/rabbit-cluster.sh start|stop|status DIR BASE_PORT [--nodes N] [--tls CERT_DIR]
#   scripts/rabbit-cluster.sh stop-node DIR BASE_PORT I
#
# Starts N nodes (default 3) of the installed RabbitMQ, named
# obx-BASE_PORT-1@localhost ... obx-BASE_PORT-N@localhost, and joins nodes
# 2..N to node 1 (stop_app, join_cluster, start_app). Node i listens on
#   BASE_PORT+i-1      AMQP (127.0.0.1)
#   BASE_PORT+10+i-1   AMQPS, with --tls (ca.crt, server.crt, server.key in
#                      CERT_DIR; verify_peer and fail_if_no_peer_cert)
#   BASE_PORT+20+i-1   Erlang distribution (the CLI tools use it +10000)
# Its data, logs and config live in DIR/nI; no plugins are enabled (so no
# node takes the management or prometheus ports of the shared broker), and
# /etc/rabbitmq is not read. The Erlang cookie is the installed one, copied
# to DIR/home.
#
# A test run passes OBX_CLUSTER_OWNER (its pid): a cluster whose recorded
# owner is another live process is refused (start, stop, stop-node exit 1),
# so two test runs on one machine cannot pull a cluster from under each other.
#
# start is idempotent: a cluster that is up (started with the same options,
# every node running and in the cluster) is left as it is; anything else in DIR or on these node names
# (a test killed half-way) is stopped and wiped first. stop stops every
# node of DIR, killing one that does not answer; stop-node stops node I
# alone (rabbitmqctl stop). status says which nodes run.
# Each command says what it did and exits non-zero if it could not.
set -eu

usage() {
    echo "usage: $0 start|stop|status DIR BASE_PORT [--nodes N] [--tls CERT_DIR]" >&2
    echo "       $0 stop-node DIR BASE_PORT I" >&2
    exit 2
}

[ $# -ge 3 ] || usage
cmd=$1
dir=$2
base=$3
shift 3
nodes=3
tls=
one=
if [ "$cmd" = stop-node ]; then
    [ $# -eq 1 ] || usage
    one=$1
    shift
    case $one in [1-9]) ;; *) echo "I must be a node number 1 to 9, got $one" >&2; exit 2 ;; esac
fi
while [ $# -gt 0 ]; do
    case $1 in
    --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
    --tls) tls=${2:?--tls needs a directory}; shift 2 ;;
    *) usage ;;
    esac
done
case $base in '' | *[!0-9]*) echo "BASE_PORT must be a number, got $base" >&2; exit 2 ;; esac
case $nodes in '' | *[!0-9]* | 0) echo "--nodes must be 1 to 9, got $nodes" >&2; exit 2 ;; esac
[ "$nodes" -le 9 ] || { echo "--nodes must be 1 to 9, got $nodes" >&2; exit 2; }
if [ "$base" -lt 1024 ] || [ $((base + 30 + 10000)) -gt 65535 ]; then
    echo "BASE_PORT must be between 1024 and 55505 (the CLI tools use the distribution port + 10000)" >&2
    exit 2
fi

BIN=/usr/lib/rabbitmq/bin
COOKIE=/var/lib/rabbitmq/.erlang.cookie
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

name() { echo "obx-$base-$1@localhost"; }

# The environment of node $1 (for the server and the CLI tools alike).
node_env() {
    n=$1
    export HOME="$dir/home"
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME=$(name "$n")
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$((base + n - 1))
    export RABBITMQ_DIST_PORT=$((base + 20 + n - 1))
    export RABBITMQ_CONF_ENV_FILE="$dir/empty"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/empty"
    export RABBITMQ_CONFIG_FILE="$dir/n$n/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/n$n/advanced.config"
    export RABBITMQ_MNESIA_BASE="$dir/n$n/mnesia"
    export RABBITMQ_MNESIA_DIR="$dir/n$n/mnesia/$RABBITMQ_NODENAME"
    export RABBITMQ_LOG_BASE="$dir/n$n/log"
    export RABBITMQ_PID_FILE="$dir/n$n/pid"
    # A node or CLI that fails to start writes an Erlang crash dump into
    # its working directory (the checkout, when a test runs it): keep it
    # with the node's logs instead.
    export ERL_CRASH_DUMP="$dir/n$n/log/erl_crash.dump"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() {
    n=$1
    shift
    # 9>&-: an epmd the CLI may start must not hold the lock.
    (node_env "$n" && "$BIN/rabbitmqctl" -q -n "$(name "$n")" "$@" 9>&-)
}

# Node $1 is registered with epmd (instant, unlike a CLI call).
registered() { epmd -names 2>/dev/null | grep -q "^name obx-$base-$1 at port"; }

running() { registered "$1" && ctl "$1" ping >/dev/null 2>&1; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { echo "$(($1 / 1000)).$(($1 % 1000 / 100))s"; }

# Node $1 is running and knows all $nodes nodes as running members.
in_cluster() {
    out=$(ctl "$1" cluster_status --formatter json 2>/dev/null) || return 1
    for m in $(seq 1 "$nodes"); do
        echo "$out" | grep -q "\"running_nodes\":\[[^]]*\"$(name "$m")\"" || return 1
    done
}

stop_node() {
    n=$1
    pidfile="$dir/n$n/pid"
    if registered "$n"; then
        if [ -f "$pidfile" ]; then
            ctl "$n" stop "$pidfile" >/dev/null 2>&1 || true
        else
            ctl "$n" stop >/dev/null 2>&1 || true
        fi
        echo "stopped $(name "$n")"
    fi
    # A node that did not answer (or did not exit) is killed.
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
            echo "killed $(name "$n") (pid $pid), which did not stop"
        fi
        rm -f "$pidfile"
    fi
}

stop_all() {
    # Every node directory in DIR, and every node name on these ports.
    for n in $(seq 1 9); do
        if [ -d "$dir/n$n" ] || registered "$n"; then
            stop_node "$n" &
        fi
    done
    wait
}

write_config() {
    n=$1
    mkdir -p "$dir/n$n/log" "$dir/n$n/mnesia"
    {
        echo "listeners.tcp.default = 127.0.0.1:$((base + n - 1))"
        # guest may log in from anywhere; the listeners are on loopback only.
        echo "loopback_users = none"
        # A short-lived test node: no disk alarm on a nearly full /tmp.
        echo "disk_free_limit.absolute = 50MB"
        if [ -n "$tls" ]; then
            echo "listeners.ssl.default = 127.0.0.1:$((base + 10 + n - 1))"
            echo "ssl_options.cacertfile = $tls/ca.crt"
            echo "ssl_options.certfile = $tls/server.crt"
            echo "ssl_options.keyfile = $tls/server.key"
            echo "ssl_options.verify = verify_peer"
            echo "ssl_options.fail_if_no_peer_cert = true"
        fi
    } >"$dir/n$n/rabbitmq.conf"
    echo "[]." >"$dir/n$n/advanced.config"
}

start_node() {
    n=$1
    write_config "$n"
    (
        node_env "$n"
        # setsid: the node outlives this script but not as its child.
        setsid "$BIN/rabbitmq-server" >"$dir/n$n/log/console.log" 2>&1 </dev/null 9>&- &
    )
}

start() {
    # Started with the same options, and whole: nothing to do.
    if [ "$(cat "$dir/up" 2>/dev/null)" = "nodes=$nodes tls=$tls" ] && registered 1 && in_cluster 1; then
        echo "already running: $(for n in $(seq 1 "$nodes"); do printf '%s ' "$(name "$n")"; done)(nothing done)"
        return
    fi
    stop_all
    if [ -d "$dir/n1" ]; then
        echo "removed the data of an earlier cluster in $dir"
    fi
    rm -rf "$dir/home" "$dir/up" "$dir/join.log" "$dir"/n[0-9]
    mkdir -p "$dir/home"
    cp "$COOKIE" "$dir/home/.erlang.cookie"
    chmod 400 "$dir/home/.erlang.cookie"
    : >"$dir/empty"
    began=$(now_ms)
    for n in $(seq 1 "$nodes"); do
        start_node "$n"
    done
    for n in $(seq 1 "$nodes"); do
        if ! ctl "$n" wait "$dir/n$n/pid" --timeout 60 >/dev/null 2>&1; then
            echo "$(name "$n") did not start; its log: $dir/n$n/log" >&2
            tail -n 20 "$dir/n$n/log/console.log" >&2 || true
            stop_all
            exit 1
        fi
    done
    booted=$(now_ms)
    # stop_app and start_app (a few seconds each) run on all joining nodes
    # at once; the joins themselves, one at a time.
    # Their chatter (a joining node's start_app logs errors about peers
    # it has not met yet) goes to join.log, shown if the join fails.
    joinlog="$dir/join.log"
    for n in $(seq 2 "$nodes"); do ctl "$n" stop_app >>"$joinlog" 2>&1 & done
    wait
    for n in $(seq 2 "$nodes"); do ctl "$n" join_cluster "$(name 1)" >>"$joinlog" 2>&1 || true; done
    for n in $(seq 2 "$nodes"); do ctl "$n" start_app >>"$joinlog" 2>&1 & done
    wait
    if ! in_cluster 1; then
        echo "the nodes did not form one cluster:" >&2
        cat "$joinlog" >&2 || true
        ctl 1 cluster_status >&2 || true
        stop_all
        exit 1
    fi
    echo "nodes=$nodes tls=$tls" >"$dir/up"
    done_ms=$(now_ms)
    for n in $(seq 1 "$nodes"); do
        ports="amqp 127.0.0.1:$((base + n - 1))"
        [ -z "$tls" ] || ports="$ports, amqps 127.0.0.1:$((base + 10 + n - 1))"
        echo "started $(name "$n"): $ports"
    done
    echo "cluster of $nodes up in $(secs $((done_ms - began))): booted in $(secs $((booted - began))), joined in $(secs $((done_ms - booted))) (data in $dir)"
}

status() {
    up=0
    for n in $(seq 1 "$nodes"); do
        if running "$n"; then
            echo "$(name "$n"): running, amqp 127.0.0.1:$((base + n - 1))"
            up=$((up + 1))
        else
            echo "$(name "$n"): not running"
        fi
    done
    if [ "$up" -gt 0 ] && in_cluster 1 2>/dev/null; then
        echo "cluster: all $nodes nodes running and joined"
    fi
    [ "$up" -eq "$nodes" ]
}

# One command at a time per DIR: a test killed during `start` leaves that
# script running, and the next run's `start` must wait for it rather than
# wipe nodes it is still joining. The nodes do not inherit the lock.
exec 9>"$dir/lock"
if ! flock -n 9; then
    echo "waiting for another rabbit-cluster.sh on $dir"
    flock 9
fi

# A test run names itself (OBX_CLUSTER_OWNER, its pid). Another run on the
# same machine with the same base port must not reuse, wipe or stop a
# cluster a live run is using: its messages would vanish under it.
owner_check() {
    [ -n "${OBX_CLUSTER_OWNER:-}" ] || return 0
    holder=$(cat "$dir/owner" 2>/dev/null || true)
    if [ -n "$holder" ] && [ "$holder" != "$OBX_CLUSTER_OWNER" ] && kill -0 "$holder" 2>/dev/null; then
        echo "the cluster in $dir (base port $base) is in use by test process $holder: another test run on this machine; not touched" >&2
        exit 1
    fi
}

case $cmd in
start)
    owner_check
    start
    if [ -n "${OBX_CLUSTER_OWNER:-}" ]; then echo "$OBX_CLUSTER_OWNER" >"$dir/owner"; fi
    ;;
stop)
    owner_check
    rm -f "$dir/owner"
    stop_all
    rm -f "$dir/up"
    echo "no node of $dir is running"
    ;;
stop-node)
    owner_check
    if registered "$one" || [ -f "$dir/n$one/pid" ]; then
        stop_node "$one"
    else
        echo "$(name "$one") is not running (nothing done)"
    fi
    rm -f "$dir/up"
    ;;
status) status ;;
*) usage ;;
esac
