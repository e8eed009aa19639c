//! A real Prometheus server for one test (Debian's `prometheus` package;
//! `scripts/prometheus.sh` installs it): its own temporary directory and a
//! free loopback port, scraping the given targets every second as job
//! `outboxd` and evaluating the given rule files every second. Killed and
//! its directory removed when the value is dropped, also when the test
//! fails. Also `promtool`, for the tests that run it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::unique;

/// A file of the repository, by its path from the root.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn missing(tool: &str) -> String {
    format!(
        "{tool} not found: install Prometheus with scripts/prometheus.sh (Debian's prometheus package)"
    )
}

/// Runs `promtool <args>` with `stdin` as its input; panics if it cannot start.
pub fn promtool(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", missing("promtool")));
    {
        use std::io::Write;
        let mut input = child.stdin.take().expect("stdin is piped");
        input
            .write_all(stdin.as_bytes())
            .expect("write to promtool");
    }
    child.wait_with_output().expect("promtool runs")
}

pub struct TestPrometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl TestPrometheus {
    /// Starts Prometheus scraping `targets` (job `outboxd`, every second)
    /// and evaluating `rule_files` (every second), and waits until it is ready.
    pub async fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Self {
        let dir = std::env::temp_dir().join(unique("outboxd-prometheus"));
        std::fs::create_dir_all(&dir).expect("create the Prometheus directory");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("  - '{}'\n", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: outboxd\n    static_configs:\n      - targets: [{}]\n",
            rules.concat(),
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log file");
        // A free port: bound, then released for Prometheus to take.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", missing("prometheus")));
        let mut prometheus = TestPrometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("Prometheus exited ({status}):\n{}", prometheus.log());
            }
            if let Some((200, _)) = get(addr, "/-/ready").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready after 60 s:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        prometheus
    }

    /// What Prometheus has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path and returns its `data`, panicking on an error answer.
    pub async fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = get(self.addr, path_and_query)
            .await
            .unwrap_or_else(|| panic!("Prometheus does not answer {path_and_query}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path_and_query}: not JSON ({e}): {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "{path_and_query}: {status} {body}"
        );
        v["data"].clone()
    }

    /// The instant vector of `expr` now: each element's labels and value.
    pub async fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"]
            .as_array()
            .expect("a vector is an array")
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{expr}: a sample without a value: {s}"));
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// The active (pending or firing) alerts.
    pub async fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts").await["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The values of `label` on the series of `metric`.
    pub async fn label_values(&self, label: &str, metric: &str) -> Vec<String> {
        let data = self
            .api(&format!(
                "/api/v1/label/{label}/values?{}={}",
                encode("match[]"),
                encode(metric)
            ))
            .await;
        data.as_array()
            .expect("label values are an array")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.0 GET: Prometheus then answers without chunked encoding and
/// closes the connection. (status, body), or None if it cannot be reached.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}
