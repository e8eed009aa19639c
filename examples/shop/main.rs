//! The shop example: three services joined by outboxd. `scripts/shop.sh`
//! runs the whole demo; the steps, one by one:
//!
//! ```text
//! shop setup                     drop and create shop_orders, shop_payments, shop_inventory
//! outboxd migrate -c examples/shop/outboxd.toml
//! shop declare                   exchange shop.events, queues shop.orders, shop.payments, shop.inventory
//! outboxd run -c examples/shop/outboxd.toml &
//! shop serve orders & shop serve payments & shop serve inventory &
//! shop place --orders 300
//! shop wait                      until every order is settled
//! shop summary                   how orders ended, money and stock, duplicates dropped
//! shop reconcile                 cross-checks the three databases (exit 1 on a disagreement)
//! ```
//!
//! `SHOP_PG`, `SHOP_AMQP` and `SHOP_PREFIX` (or `--pg`, `--amqp`,
//! `--prefix`) say where; the defaults are the local services and `shop`.

// The services live in mod.rs, so that the shop test can include the
// same code with #[path].
#[path = "mod.rs"]
mod shop;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use shop::error::Error;
use shop::names::{Names, Service};
use shop::service::{ServiceOptions, Stats};
use shop::{db, orders, reconcile, setup, summary, topology};

#[derive(Parser)]
#[command(
    name = "shop",
    about = "The outboxd shop example: orders, payments and inventory"
)]
struct Cli {
    /// PostgreSQL server, without a database name.
    #[arg(
        long,
        env = "SHOP_PG",
        default_value = "postgres://root@127.0.0.1:5432"
    )]
    pg: String,
    /// RabbitMQ.
    #[arg(
        long,
        env = "SHOP_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
    /// Names the databases (<prefix>_orders, ...), the exchange (<prefix>.events) and the queues (<prefix>.orders, ...).
    #[arg(long, env = "SHOP_PREFIX", default_value = "shop")]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drops and creates the three databases, their tables and inboxes, and the opening state.
    Setup,
    /// Declares the exchange and the queues (durable) and empties the queues.
    Declare,
    /// Runs one service until SIGTERM or Ctrl-C.
    Serve {
        /// orders, payments or inventory.
        #[arg(value_parser = parse_service)]
        service: Service,
        /// Consumers, each on its own broker connection.
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Unacked deliveries per consumer.
        #[arg(long, default_value_t = 20)]
        prefetch: u16,
        /// Demo fault: hand every n-th handled message back to the broker
        /// after its commit instead of acking it, as a consumer that dies
        /// between commit and ack would. The inbox drops the redelivery.
        #[arg(long)]
        lose_ack_every: Option<u64>,
    },
    /// Places orders, a seeded mix that reaches every branch of the saga.
    Place {
        #[arg(long, default_value_t = 300)]
        orders: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Orders placed at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Waits until every order is settled, every outbox is empty and every queue is drained.
    Wait {
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Prints how orders ended, money and stock before and after, and the duplicates the inboxes dropped.
    Summary,
    /// Cross-checks the three databases (read-only); exits 1 if anything disagrees.
    Reconcile,
}

fn parse_service(s: &str) -> Result<Service, String> {
    Service::parse(s).ok_or_else(|| format!("{s:?} is not orders, payments or inventory"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // lapin logs returned messages with their payloads at WARN, and
                // tokio-postgres logs server NOTICEs at INFO.
                .unwrap_or_else(|_| "info,lapin=error,tokio_postgres=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("shop: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(try_main(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shop: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> Result<ExitCode, Error> {
    let names = Names::with_prefix(&cli.pg, &cli.amqp, &cli.prefix);
    match cli.command {
        Command::Setup => {
            setup::create_databases(&names).await?;
            for service in Service::ALL {
                let client = db::connect(&names.database_url(service)).await?;
                setup::prepare(&client, service).await?;
            }
            println!(
                "created {}, {} and {}: tables, inboxes, {} customers, {} products",
                names.orders_db,
                names.payments_db,
                names.inventory_db,
                setup::CUSTOMERS,
                setup::PRODUCTS.len()
            );
        }
        Command::Declare => {
            let conn = lapin::Connection::connect(&names.amqp, Default::default()).await?;
            let channel = conn.create_channel().await?;
            topology::declare(&channel, &names, topology::Lifetime::Durable, true).await?;
            println!(
                "topic exchange {:?}; queues {:?}, {:?}, {:?} (empty)",
                names.exchange,
                names.queue(Service::Orders),
                names.queue(Service::Payments),
                names.queue(Service::Inventory)
            );
            let _ = conn.close(200, "done".into()).await;
        }
        Command::Serve {
            service,
            consumers,
            prefetch,
            lose_ack_every,
        } => {
            let stop = CancellationToken::new();
            tokio::spawn(stop_on_signal(stop.clone()));
            let options = ServiceOptions {
                service,
                database_url: names.database_url(service),
                amqp_url: names.amqp.clone(),
                queue: names.queue(service),
                consumers,
                prefetch,
                lose_ack_every,
            };
            shop::service::run(options, Arc::new(Stats::default()), stop).await?;
        }
        Command::Place {
            orders: n,
            seed,
            concurrency,
        } => {
            let pool = db::pool(
                &names.database_url(Service::Orders),
                concurrency.max(1),
                "shop-place",
            )?;
            let started = Instant::now();
            let ids = orders::place_all(&pool, orders::mix(n, seed), concurrency).await?;
            println!(
                "placed {} orders ({} to {}) in {:.1}s",
                ids.len(),
                ids.first().map_or("-", String::as_str),
                ids.last().map_or("-", String::as_str),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Wait { timeout } => return wait(&names, timeout).await,
        Command::Summary => println!("{}", summary::snapshot(&names).await?),
        Command::Reconcile => {
            let report = reconcile::reconcile(&names).await?;
            println!("{report}");
            if !report.disagreements.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls until settled: no order pending, no outbox row left, no message
/// ready in a queue. Exit 1 with the last figures if `timeout` passes first.
async fn wait(names: &Names, timeout: Duration) -> Result<ExitCode, Error> {
    let started = Instant::now();
    let conn = lapin::Connection::connect(&names.amqp, Default::default()).await?;
    let channel = conn.create_channel().await?;
    let mut last_report = Instant::now();
    loop {
        let s = summary::snapshot(names).await?;
        let queued: u32 = topology::ready(&channel, names)
            .await?
            .iter()
            .map(|(_, n)| n)
            .sum();
        if s.pending == 0 && s.outbox_backlog() == 0 && queued == 0 {
            println!(
                "settled after {:.1}s: {} orders, none pending",
                started.elapsed().as_secs_f64(),
                s.placed
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > timeout {
            println!(
                "not settled within {timeout:?}: {} orders pending, {} outbox rows, {queued} messages queued",
                s.pending,
                s.outbox_backlog()
            );
            return Ok(ExitCode::FAILURE);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            info!(
                pending = s.pending,
                outbox = s.outbox_backlog(),
                queued,
                "waiting for the shop to settle"
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM or SIGINT stops the service at its next safe point.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        // Without a SIGTERM handler, Ctrl-C still works.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("stopping");
    stop.cancel();
}
