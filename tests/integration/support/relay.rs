//! The real `outboxd` binary in a child process: started on a generated
//! config, observed through its JSON logs and its HTTP endpoints, stopped
//! with SIGTERM or SIGKILL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::http;
use super::{AMQP_URL, eventually, unique};

pub const BIN: &str = env!("CARGO_BIN_EXE_outboxd");

/// One `[[source]]`; `set` overrides or adds keys (values are TOML literals).
pub struct SourceSpec {
    pub keys: BTreeMap<String, String>,
}

impl SourceSpec {
    /// Fast-moving test defaults: short poll and retry times.
    pub fn new(name: &str, database_url: &str, exchange: &str) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert("name".into(), format!("{name:?}"));
        keys.insert("database_url".into(), format!("{database_url:?}"));
        keys.insert("exchange".into(), format!("{exchange:?}"));
        keys.insert("poll_interval".into(), "\"200ms\"".into());
        keys.insert("retry_initial".into(), "\"100ms\"".into());
        keys.insert("retry_max".into(), "\"500ms\"".into());
        Self { keys }
    }

    pub fn set(mut self, key: &str, toml_value: &str) -> Self {
        self.keys.insert(key.into(), toml_value.into());
        self
    }
}

/// A whole config: JSON logs, an ephemeral metrics port, short timeouts.
pub fn config(amqp_url: &str, sources: &[SourceSpec]) -> String {
    let mut text = format!(
        "[log]\nlevel = \"info,outboxd=debug\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\nbacklog_interval = \"100ms\"\n\
         [shutdown]\ndrain_timeout = \"5s\"\n\
         [rabbitmq]\nurl = {amqp_url:?}\nconfirm_timeout = \"5s\"\n"
    );
    for s in sources {
        text.push_str("[[source]]\n");
        for (k, v) in &s.keys {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text
}

/// The usual single-source config against the real broker.
pub fn simple_config(database_url: &str, exchange: &str) -> String {
    config(
        AMQP_URL,
        &[SourceSpec::new("orders", database_url, exchange)],
    )
}

/// Writes `text` to a temporary file that lives as long as the value.
pub struct TempConfig(pub PathBuf);

impl TempConfig {
    pub fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("outboxd-test")));
        std::fs::write(&path, text).expect("write config");
        Self(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `outboxd <args> -c <config>` to completion: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], config_text: &str) -> (Option<i32>, String, String) {
    let cfg = TempConfig::new(config_text);
    let out = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(&cfg.0)
        .env_remove("RUST_LOG")
        .output()
        .expect("run outboxd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Relay {
    child: Child,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _config: TempConfig,
}

impl Relay {
    /// Starts `outboxd run` and waits until it serves its endpoints.
    pub async fn start(config_text: &str) -> Relay {
        let config = TempConfig::new(config_text);
        let mut child = Command::new(BIN)
            .args(["run", "--log-format", "json", "-c"])
            .arg(&config.0)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outboxd");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("OUTBOXD_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let l = logs.clone();
        let admin = eventually("outboxd to start", Duration::from_secs(30), || {
            let found = l.lock().unwrap().iter().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["message"] == "outboxd running").then(|| v["admin"].as_str()?.parse().ok())?
            });
            async move { found }
        })
        .await;
        Relay {
            child,
            admin,
            logs,
            _config: config,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines whose message contains `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }

    pub async fn metrics(&self) -> String {
        http::get(self.admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub async fn metric(&self, series: &str) -> Option<f64> {
        http::sample(&self.metrics().await, series)
    }

    /// Waits until `series` reaches `value` exactly.
    pub async fn wait_metric(&self, series: &str, value: f64, timeout: Duration) {
        eventually(&format!("{series} == {value}"), timeout, || async move {
            (self.metric(series).await == Some(value)).then_some(())
        })
        .await
    }

    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let (code, body) = http::get(self.admin, "/readyz")
            .await
            .expect("readyz answers");
        (code, serde_json::from_str(&body).expect("readyz is JSON"))
    }

    pub async fn wait_ready(&self, code: u16, timeout: Duration) {
        eventually(&format!("/readyz {code}"), timeout, || async move {
            (self.readyz().await.0 == code).then_some(())
        })
        .await
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the relay was doing.
        if std::thread::panicking() {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            let from = logs.len().saturating_sub(LOG_TAIL);
            eprintln!(
                "--- the relay's last {} of {} log lines ---",
                logs.len() - from,
                logs.len()
            );
            for line in &logs[from..] {
                eprintln!("{line}");
            }
        }
    }
}

/// How many of its last log lines a relay prints when its test fails.
const LOG_TAIL: usize = 80;
