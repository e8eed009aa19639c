//! The operator kit against a real Prometheus: the alert rules pass
//! promtool and their unit tests, the PrometheusRule is the same rules, a
//! real scrape passes `promtool check metrics` and has every metric the
//! rules and the dashboard name, and a Prometheus scraping a running relay
//! answers every dashboard query and raises the broker-down alert in an
//! outage.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::prometheus::{TestPrometheus, promtool, repo_file};
use crate::support::proxy::Proxy;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_HOST, eventually};

const WAIT: Duration = Duration::from_secs(30);
const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts_test.yaml";
const DASHBOARD: &str = "deploy/grafana/outboxd.json";

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The alert names of the rule file, in order.
fn alert_names() -> Vec<String> {
    read(ALERTS)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every `outboxd_*` and `process_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["outboxd_", "process_"] {
        for (start, _) in text.match_indices(prefix) {
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue; // inside a longer name
            }
            if text[..start]
                .trim_end_matches('"')
                .trim_end()
                .ends_with('=')
            {
                continue; // a config value (`slot = "outboxd_orders"`), not a metric
            }
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `process_*` names a family, not a metric.
            if !name.ends_with('_') {
                names.insert(name);
            }
        }
    }
    names
}

/// The expressions of every panel's targets (rows' nested panels included).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?} has a target without expr"));
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_is_tested_firing_and_silent() {
    let check = promtool(
        &["check", "rules", &repo_file(ALERTS).display().to_string()],
        "",
    );
    assert!(
        check.status.success(),
        "promtool check rules:\n{}",
        text(&check)
    );
    let names = alert_names();
    assert!(
        text(&check).contains(&format!("SUCCESS: {} rules found", names.len())),
        "every rule is an alert: {}",
        text(&check)
    );
    let unit = promtool(
        &[
            "test",
            "rules",
            &repo_file(ALERT_TESTS).display().to_string(),
        ],
        "",
    );
    assert!(
        unit.status.success(),
        "promtool test rules:\n{}",
        text(&unit)
    );
    assert!(text(&unit).contains("SUCCESS"), "{}", text(&unit));

    // Each alert has a case where it fires (exp_alerts) and one where it
    // must not (no exp_alerts). A case's exp_alerts follow its alertname.
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut current: Option<(String, bool)> = None;
    let mut close = |case: Option<(String, bool)>| {
        if let Some((name, fires)) = case {
            let set = if fires { &mut firing } else { &mut silent };
            set.insert(name);
        }
    };
    for line in read(ALERT_TESTS).lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alertname: ") {
            close(current.take());
            current = Some((name.trim().to_owned(), false));
        } else if line.starts_with("exp_alerts:") {
            if let Some((_, fires)) = current.as_mut() {
                *fires = true;
            }
        } else if line.starts_with("- name: ") {
            close(current.take());
        }
    }
    close(current.take());
    for name in &names {
        assert!(firing.contains(name), "no test where {name} fires");
        assert!(silent.contains(name), "no test where {name} stays silent");
    }
    assert!(names.len() >= 10, "{names:?}");
}

#[test]
fn the_prometheus_rule_is_the_alert_rules_under_spec() {
    let out = Command::new("bash")
        .arg(repo_file("scripts/prometheusrule.sh"))
        .arg("--check")
        .output()
        .expect("run scripts/prometheusrule.sh");
    assert!(out.status.success(), "{}", text(&out));
    let rule = read("deploy/kubernetes/prometheusrule.yaml");
    assert!(
        rule.contains("\napiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\n"),
        "{rule}"
    );
    for name in alert_names() {
        assert!(
            rule.contains(&format!("  - alert: {name}\n")),
            "{name} missing"
        );
    }
}

/// A relay on its own database, exchange and queue, connected to the
/// broker through `proxy`; it has published `rows` rows.
async fn relay_with_traffic(db: &TestDb, broker: &TestBroker, proxy: &Proxy, rows: usize) -> Relay {
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let cfg = config(
        &url,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    );
    let relay = Relay::start(&cfg).await;
    relay.wait_ready(200, WAIT).await;
    db.insert_rows(rows, 100).await;
    eventually("the rows to go out", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_passes_promtool_and_has_every_metric_the_rules_and_dashboard_use() {
    let db = TestDb::migrated("obx_promlint").await;
    let broker = TestBroker::new("#").await;
    let proxy = Proxy::start(AMQP_HOST).await;
    let relay = relay_with_traffic(&db, &broker, &proxy, 50).await;
    // A capture = "wal" source exports the slot series, which only such
    // sources have: a relay with one of those scraped too.
    let wal_db = TestDb::empty("obx_promlint_wal").await;
    let wal_cfg = config(
        crate::support::AMQP_URL,
        &[SourceSpec::new(&wal_db.name, &wal_db.url, &broker.exchange).set("capture", "\"wal\"")],
    );
    let (code, _, err) = run_to_end(&["migrate"], &wal_cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    let wal_relay = Relay::start(&wal_cfg).await;
    let slot_active = format!("outboxd_slot_active{{source=\"{}\"}}", wal_db.name);
    wal_relay.wait_metric(&slot_active, 1.0, WAIT).await;
    let scrape = relay.metrics().await;
    let wal_scrape = wal_relay.metrics().await;
    assert!(
        scrape.contains("outboxd_messages_published_total{source=\"orders\"} 50"),
        "{scrape}"
    );

    for one in [&scrape, &wal_scrape] {
        let lint = promtool(&["check", "metrics"], one);
        assert!(
            lint.status.success() && text(&lint).trim().is_empty(),
            "promtool check metrics:\n{}",
            text(&lint)
        );
    }

    let mut exported = BTreeSet::new();
    for line in scrape.lines().chain(wal_scrape.lines()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    for file in [ALERTS, DASHBOARD, "README.md"] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics outboxd does not export: {unknown:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_query_and_raises_broker_down_in_an_outage() {
    let db = TestDb::migrated("obx_prometheus").await;
    let mut broker = TestBroker::new("#").await;
    let proxy = Proxy::start(AMQP_HOST).await;
    let relay = relay_with_traffic(&db, &broker, &proxy, 300).await;
    let prometheus = TestPrometheus::start(&[relay.admin], &[repo_file(ALERTS)]).await;
    let instance = relay.admin.to_string();
    let broker_down = |alerts: &[Value]| -> Vec<Value> {
        alerts
            .iter()
            .filter(|a| a["labels"]["alertname"] == "OutboxdBrokerDown")
            .cloned()
            .collect()
    };

    // Scraped, and the rules evaluated with the broker up: no alert yet.
    eventually("Prometheus to scrape the relay", WAIT, || async {
        let published = prometheus
            .query("outboxd_messages_published_total{job=\"outboxd\",source=\"orders\"}")
            .await;
        let up = prometheus.query("outboxd_broker_up").await;
        (published.first().map(|s| s.1) == Some(300.0) && up.first().map(|s| s.1) == Some(1.0))
            .then_some(())
    })
    .await;
    assert!(broker_down(&prometheus.alerts().await).is_empty());

    // The outage: rows keep coming, the alert goes pending (its `for` is a minute).
    proxy.cut();
    relay.wait_metric("outboxd_broker_up", 0.0, WAIT).await;
    let more = db.insert_rows(200, 100).await;
    let alert = eventually("OutboxdBrokerDown to go pending", WAIT, || async {
        broker_down(&prometheus.alerts().await).pop()
    })
    .await;
    assert_eq!(alert["state"], "pending", "{alert}");
    assert_eq!(alert["labels"]["instance"], instance.as_str(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    assert_eq!(
        alert["annotations"]["summary"],
        format!("outboxd {instance} is not connected to RabbitMQ"),
        "{alert}"
    );

    // Back: the alert goes away and the rows of the outage go out.
    proxy.restore();
    eventually("OutboxdBrokerDown to clear", WAIT, || async {
        broker_down(&prometheus.alerts().await)
            .is_empty()
            .then_some(())
    })
    .await;
    eventually("the outage's rows to go out", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    // 500 rows and their duplicates, then 3 s without a message.
    let got = broker.collect(1000, Duration::from_secs(3)).await;
    let ids: BTreeSet<_> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert!(
        more.iter().all(|k| ids.contains(k)),
        "every row of the outage arrived"
    );
    eventually(
        "Prometheus to see the outage's rows published",
        WAIT,
        || async {
            let published = prometheus
                .query("outboxd_messages_published_total{source=\"orders\"}")
                .await;
            published
                .first()
                .is_some_and(|s| s.1 >= 500.0)
                .then_some(())
        },
    )
    .await;

    // The dashboard's source variable lists the source ...
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let source = variables
        .iter()
        .find(|v| v["name"] == "source")
        .expect("a source variable");
    let definition = source["definition"].as_str().expect("its query");
    let (metric, label) = definition
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(')'))
        .and_then(|d| d.split_once(", "))
        .unwrap_or_else(|| panic!("not label_values(METRIC, LABEL): {definition}"));
    assert_eq!(
        prometheus.label_values(label, metric).await,
        vec!["orders".to_owned()]
    );

    // ... and every panel's query, for that source, returns numbers.
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, expr) in queries {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$source", "orders");
        assert!(
            !expr.contains('$'),
            "panel {title:?}: a variable the test does not know: {expr}"
        );
        let result = prometheus.query(&expr).await;
        assert!(!result.is_empty(), "panel {title:?}: no data for {expr}");
        for (labels, value) in result {
            assert!(
                value.is_finite(),
                "panel {title:?}: {value} for {labels} from {expr}"
            );
        }
    }
}
