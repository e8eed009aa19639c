//! The local services and the relay binary, with create/cleanup helpers.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_postgres::{Client, NoTls};

pub const PG: &str = "postgres://root@127.0.0.1:5432";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The broker's address in `AMQP`, for the recovery run's proxy.
pub const AMQP_ADDR: &str = "127.0.0.1:5672";
/// Payload size of the drain and ceiling messages.
pub const PAYLOAD_BYTES: usize = 512;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    /// The queue arguments that make this type.
    fn arguments(self) -> FieldTable {
        let mut args = FieldTable::default();
        if self == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
            );
        }
        args
    }

    pub fn name(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

pub struct Env {
    pub admin: Client,
    pub amqp: Connection,
    pub relay_bin: PathBuf,
    pg_version: String,
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn pg(url: &str) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

impl Env {
    pub async fn new() -> Result<Self, String> {
        let relay_bin = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("outboxd");
        if !relay_bin.exists() {
            return Err(format!(
                "{} not found; build it first (scripts/bench.sh does: cargo build --release -p outboxd -p outboxd-bench)",
                relay_bin.display()
            ));
        }
        let admin = pg(&format!("{PG}/postgres")).await?;
        let amqp = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ: {e}"))?;
        let pg_version: String = admin
            .query_one("SHOW server_version", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        Ok(Self {
            admin,
            amqp,
            relay_bin,
            pg_version,
        })
    }

    pub fn describe(&self) -> String {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let rmq = self.amqp.status().vhost();
        format!(
            "{cores} cores, PostgreSQL {}, RabbitMQ on 127.0.0.1 (vhost {rmq}), relay {}",
            self.pg_version,
            self.relay_bin.display()
        )
    }

    pub async fn create_db(&self, prefix: &str) -> Result<(String, String), String> {
        let name = unique(prefix);
        self.admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| e.to_string())?;
        Ok((name.clone(), format!("{PG}/{name}")))
    }

    pub async fn drop_db(&self, name: &str) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }

    /// Creates the outbox table with outboxd's own migration.
    pub async fn migrate(&self, url: &str) -> Result<(), String> {
        let text = format!(
            "[rabbitmq]\nurl = \"{AMQP}\"\n[[source]]\nname = \"b\"\ndatabase_url = \"{url}\"\n"
        );
        let config =
            outboxd::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
        // The whole chain: the server's message is in the error's source.
        outboxd::migrate::run(&config, false, std::time::Duration::ZERO)
            .await
            .map_err(|e| outboxd::telemetry::ErrorChain(&e).to_string())
    }

    /// Inserts `n` rows over `aggregates` aggregates, then VACUUM ANALYZE
    /// (a fresh table as a long-running one would be).
    pub async fn fill(&self, url: &str, n: usize, aggregates: usize) -> Result<(), String> {
        self.insert_rows(url, n, aggregates).await?;
        let c = pg(url).await?;
        c.batch_execute("VACUUM ANALYZE outbox")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Inserts `n` rows (seq 1..=n) over `aggregates` aggregates in one transaction.
    pub async fn insert_rows(&self, url: &str, n: usize, aggregates: usize) -> Result<(), String> {
        insert_seqs(&pg(url).await?, 1, n as i64, aggregates as i64).await?;
        Ok(())
    }

    /// A topic exchange and a durable queue of `kind` bound with "#".
    pub async fn declare(&self, kind: QueueType) -> Result<(Channel, String), String> {
        let ch = self
            .amqp
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let name = unique("bench");
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let args = kind.arguments();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(name.as_str().into(), durable, args)
            .await
            .map_err(|e| e.to_string())?;
        ch.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok((ch, name))
    }

    pub async fn message_count(&self, kind: QueueType, queue: &str) -> Result<u32, String> {
        let ch = self
            .amqp
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let args = kind.arguments();
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(queue.into(), passive, args)
            .await
            .map_err(|e| e.to_string())?;
        let _ = ch.close(200, "OK".into()).await;
        Ok(q.message_count())
    }

    pub async fn undeclare(&self, ch: &Channel, name: &str) {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }

    /// A `capture = "wal"` relay config on `url` with a slot of its own,
    /// after `outboxd migrate` made the table, publication and slot.
    /// Returns the config and the slot's name (see [`Env::drop_wal_db`]).
    pub async fn wal_config(
        &self,
        url: &str,
        exchange: &str,
        extra: &str,
    ) -> Result<(String, String), String> {
        let slot = unique("bench_wal_slot");
        let config = relay_config(
            url,
            exchange,
            &format!("capture = \"wal\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n{extra}"),
        );
        let parsed =
            outboxd::config::Config::from_toml(&config, &|_| None).map_err(|e| e.to_string())?;
        outboxd::migrate::run(&parsed, false, std::time::Duration::ZERO)
            .await
            .map_err(|e| outboxd::telemetry::ErrorChain(&e).to_string())?;
        Ok((config, slot))
    }

    /// Drops a database that has a slot (which must go first; its last
    /// reader may take a moment to let go of it).
    pub async fn drop_wal_db(&self, db: &str, url: &str, slot: &str) {
        if let Ok(c) = pg(url).await {
            for _ in 0..50 {
                let dropped = c
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await;
                if dropped.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.drop_db(db).await;
    }

    pub async fn spawn_relay(&self, config: &str) -> Result<Relay, String> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("outboxd-bench")));
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        // BENCH_RELAY_LOG=FILTER:PATH (say `outboxd=debug:/tmp/relay.log`):
        // the relays log with that filter, and every line goes to PATH too.
        // For looking into a run; the figures of such a run are not kept.
        let trace = std::env::var("BENCH_RELAY_LOG").ok().and_then(|v| {
            let (filter, file) = v.split_once(':')?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .ok()?;
            Some((filter.to_owned(), file))
        });
        let mut command = Command::new(&self.relay_bin);
        command
            .args(["run", "--log-format", "json", "-c"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((filter, _)) = &trace {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.relay_bin.display()))?;
        let mut trace = trace.map(|(_, file)| file);
        let admin: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let found = admin.clone();
        let stderr = child.stderr.take().ok_or("no stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = trace.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "outboxd running" {
                        *found.lock().unwrap_or_else(|e| e.into_inner()) =
                            v["admin"].as_str().and_then(|a| a.parse().ok());
                    }
                    if v["level"] == "ERROR" || v["level"] == "WARN" {
                        eprintln!("relay: {line}");
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = *admin.lock().unwrap_or_else(|e| e.into_inner()) {
                return Ok(Relay {
                    child,
                    admin: addr,
                    config: path,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("the relay did not start within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub struct Relay {
    child: Child,
    pub admin: SocketAddr,
    config: PathBuf,
}

impl Relay {
    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        ProcStat::read(Path::new(&format!("/proc/{}", self.child.id()))).map_or(0.0, |p| p.own)
    }

    /// Resident set size in MB.
    pub fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(self.admin).await else {
            return String::new();
        };
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// Waits until the relay has published `rows` messages (its own
    /// counter: polling the table would cost the database more than the
    /// relay does), at most 10 minutes.
    pub async fn wait_published(&self, rows: usize, what: &str) -> Result<(), String> {
        self.wait_for(
            "outboxd_messages_published_total{source=\"bench\"}",
            rows as f64,
            Duration::from_secs(600),
            what,
        )
        .await
    }

    /// Waits until `series` reaches `at_least`, polling every 20 ms.
    pub async fn wait_for(
        &self,
        series: &str,
        at_least: f64,
        limit: Duration,
        what: &str,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let value = sample(&self.metrics().await, series).unwrap_or(0.0);
            if value >= at_least {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what} did not happen in {limit:?} ({series} = {value})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Where the CPU went since it was taken: the whole machine's busy cores
/// and each side's. A machine near all its cores busy shares them: what
/// the relay, PostgreSQL and the bench take, the broker (or the
/// producers) lose; with cores idle, the CPU is not what limits a run.
pub struct CpuMark {
    started: Instant,
    machine: (f64, f64),
    broker: f64,
    /// PostgreSQL's CPU by role (`postgres_by_role`); their sum is all of
    /// PostgreSQL's.
    postgres_roles: [f64; 4],
    relay: f64,
    bench: f64,
    recvlogical: f64,
}

/// Cores used over a run (CPU seconds over wall seconds).
pub struct CpuUse {
    pub seconds: f64,
    pub broker: f64,
    pub postgres: f64,
    pub relay: f64,
}

impl CpuMark {
    /// A mark; `relay`'s CPU is counted from here on, if there is one.
    pub fn now(relay: Option<&Relay>) -> Self {
        Self {
            started: Instant::now(),
            machine: machine_ticks(),
            broker: cpu_of("beam.smp"),
            postgres_roles: postgres_by_role(),
            relay: relay.map_or(0.0, Relay::cpu_seconds),
            bench: own_cpu_seconds(),
            recvlogical: cpu_of("pg_recvlogical"),
        }
    }

    /// Cores used since the mark, printed as the JSON line of `probe`:
    /// the machine's, the broker's, PostgreSQL's, the relay's (if any),
    /// the bench's own (its producers, consumers or publishers) and
    /// pg_recvlogical's.
    pub fn report(&self, probe: &str, relay: Option<&Relay>) -> CpuUse {
        let seconds = self.started.elapsed().as_secs_f64();
        let (busy, total) = machine_ticks();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine = (busy - self.machine.0) / (total - self.machine.1).max(1.0) * cores;
        let per = |now: f64, then: f64| (now - then) / seconds;
        // One walk of /proc for PostgreSQL: its total is the sum of its
        // roles, so the two cannot disagree about a backend that came or
        // went between two walks.
        let roles = postgres_by_role();
        let role = |i: usize| per(roles[i], self.postgres_roles[i]);
        let used = CpuUse {
            seconds,
            broker: per(cpu_of("beam.smp"), self.broker),
            postgres: (0..roles.len()).map(role).sum(),
            relay: relay.map_or(0.0, |r| per(r.cpu_seconds(), self.relay)),
        };
        println!(
            "{{\"probe\":\"{probe}\",\"seconds\":{seconds:.2},\"machine_cores\":{machine:.2},\"broker_cores\":{:.2},\"postgres_cores\":{:.2},\"relay_cores\":{:.2},\"bench_cores\":{:.2},\"pg_recvlogical_cores\":{:.2},\"postgres_sessions_cores\":{:.3},\"postgres_autovacuum_cores\":{:.3},\"postgres_background_cores\":{:.3},\"postgres_exited_cores\":{:.3}}}",
            used.broker,
            used.postgres,
            used.relay,
            per(own_cpu_seconds(), self.bench),
            per(cpu_of("pg_recvlogical"), self.recvlogical),
            role(0),
            role(1),
            role(2),
            role(3),
        );
        used
    }
}

/// Total user+system CPU seconds of every process whose command name is `comm`
/// (e.g. "beam.smp", "postgres"), read from /proc, with the CPU of their
/// children that have exited (`cutime` + `cstime`). Without those, a
/// backend that exits between two readings (a client disconnecting, an
/// autovacuum worker done) took all its CPU with it, and PostgreSQL's CPU
/// over a drain could come out short by what that backend had ever used
/// (a negative `postgres_cores` once): the postmaster reaps every backend,
/// so its children's times keep the sum from going down.
pub fn cpu_of(comm: &str) -> f64 {
    processes(comm).map(|(_, p)| p.own + p.children).sum()
}

/// PostgreSQL's CPU seconds by role, from each process's title: client
/// sessions (the relay's connections, the bench's, walsenders),
/// autovacuum workers, the server's background processes (checkpointer,
/// walwriter, background writer, the postmaster itself and the rest),
/// and the exited children the postmaster has reaped (its `cutime +
/// cstime`: sessions that closed, autovacuum workers that finished).
/// Which of them a drain's PostgreSQL CPU went to.
pub fn postgres_by_role() -> [f64; 4] {
    const BACKGROUND: [&str; 8] = [
        "checkpointer",
        "walwriter",
        "background writer",
        "launcher",
        "stats",
        "archiver",
        "logger",
        "startup",
    ];
    let mut roles = [0.0; 4];
    for (dir, p) in processes("postgres") {
        let title = std::fs::read(dir.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        // The postmaster keeps its command line; its children set a title.
        let role = if !title.starts_with("postgres:") {
            2
        } else if title.contains("autovacuum") {
            1
        } else if BACKGROUND.iter().any(|b| title.contains(b)) {
            2
        } else {
            0
        };
        roles[role] += p.own;
        roles[3] += p.children;
    }
    roles
}

/// The seconds one process (a PostgreSQL backend, by its
/// `pg_backend_pid()`) has run on a CPU, to the nanosecond: the first
/// field of `/proc/<pid>/schedstat`, where `stat` counts 10 ms ticks. 0 if
/// it is gone.
pub fn backend_on_cpu_seconds(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

/// One process's CPU seconds, from `/proc/<pid>/stat`.
struct ProcStat {
    /// The command name (between the parentheses).
    comm: String,
    /// utime + stime.
    own: f64,
    /// cutime + cstime: its children that have exited and been reaped.
    children: f64,
}

impl ProcStat {
    /// `dir` is the process's `/proc/<pid>` (or `/proc/self`).
    fn read(dir: &Path) -> Option<Self> {
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        // The fields after the ")" that ends the command name: utime,
        // stime, cutime and cstime (14 to 17 in proc(5)) are the 12th to
        // 15th of them.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
        Some(Self {
            comm,
            own: ticks(11) + ticks(12),
            children: ticks(13) + ticks(14),
        })
    }
}

/// Every process whose command name is `comm`: its `/proc` directory and
/// its CPU.
fn processes(comm: &str) -> impl Iterator<Item = (PathBuf, ProcStat)> + '_ {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(move |e| {
            let dir = e.path();
            let p = ProcStat::read(&dir)?;
            (p.comm == comm).then_some((dir, p))
        })
}

/// The machine's busy and total CPU time so far, in ticks (the first line
/// of /proc/stat: busy is everything but idle and iowait).
pub fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// The CPU seconds this process (the bench, with its producers) has used.
pub fn own_cpu_seconds() -> f64 {
    ProcStat::read(Path::new("/proc/self")).map_or(0.0, |p| p.own)
}

/// The sample of `series` (exact name and labels) in a metrics text.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Commits rows seq `first..first + n` (in the payload, with padding to
/// ~512 bytes) spread as `'o-' || seq % aggregates`, in one transaction;
/// returns the highest id inserted, 0 if none.
pub async fn insert_seqs(
    client: &Client,
    first: i64,
    n: i64,
    aggregates: i64,
) -> Result<i64, String> {
    let pad = PAYLOAD_BYTES as i32 - 25;
    let last = first + n - 1;
    client
        .query_one(
            "WITH ins AS (INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'o-' || (g % $3), 'OrderCreated', jsonb_build_object('seq', g, 'pad', repeat('x', $4)) \
             FROM generate_series($1::bigint, $2::bigint) g RETURNING id) \
             SELECT coalesce(max(id), 0) FROM ins",
            &[&first, &last, &aggregates.max(1), &pad],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
}

/// One-source relay config for the bench.
pub fn relay_config(url: &str, exchange: &str, extra: &str) -> String {
    relay_config_at(AMQP, url, exchange, extra)
}

/// The same, with the relay's broker at `amqp` (the recovery run's proxy).
pub fn relay_config_at(amqp: &str, url: &str, exchange: &str, extra: &str) -> String {
    format!(
        "[log]\nlevel = \"warn,outboxd::app=info\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[rabbitmq]\nurl = \"{amqp}\"\n\
         [[source]]\nname = \"bench\"\ndatabase_url = \"{url}\"\nexchange = \"{exchange}\"\n{extra}\n"
    )
}

/// Threads that keep a given share of the machine's CPU busy until dropped:
/// `cores` = 0.3 spins one thread 3 ms in every 10 ms.
pub struct Neighbour {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Neighbour {
    pub fn burn(cores: f64) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut left = cores.max(0.0);
        while left > 0.0 {
            let duty = left.min(1.0);
            left -= duty;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let period = Duration::from_millis(10);
                let busy = period.mul_f64(duty);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let start = Instant::now();
                    while start.elapsed() < busy {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(period.saturating_sub(start.elapsed()));
                }
            }));
        }
        Neighbour { stop, threads }
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
