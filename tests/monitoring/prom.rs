//! A real Prometheus for the monitoring tests: started on a free loopback
//! port with a temporary database, scraping given ports every second, and
//! queried through its HTTP API. Also what the tests read from the
//! dashboard, the rules and a scrape.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `name` from Debian's `prometheus` package (or `$PIPIT_<NAME>`), or a
/// failure that says how to get it.
pub(crate) fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os(format!("PIPIT_{}", name.to_uppercase()))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(name));
    let ok = Command::new(&path).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        matches!(ok, Ok(s) if s.success()),
        "`{}` is missing: run `tools/dev deps` (it installs Debian's prometheus package, which has \
         prometheus and promtool)",
        path.display()
    );
    path
}

/// One HTTP/1.0 GET (so the answer is never chunked); answers the body.
fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "GET {path}: {head}\n{body}");
    body.to_string()
}

/// A node's `/metrics`.
pub(crate) fn scrape(port: u16) -> String {
    get(port, "/metrics")
}

/// The metric names in an exposition (`# HELP`/`# TYPE` lines aside).
pub(crate) fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every `pipit_...` metric name in a dashboard or rules file. Recording
/// rules (`instance:pipit_...:rate1m`) are not metrics the server
/// exports, nor are file names (`pipit-rules.yml`).
pub(crate) fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("pipit_") {
        if text[..i].ends_with(|c: char| c == ':' || c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if text[i + name.len()..].starts_with(':') {
            continue;
        }
        out.insert(name);
    }
    out
}

/// Every query (`targets[].expr`) of a Grafana dashboard, rows included.
pub(crate) fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The value of one instant-vector sample.
pub(crate) fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of its own; killed when dropped.
pub(crate) struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    /// Starts `bin` with a database under `dir`, scraping `targets` (job
    /// "pipit") every second and evaluating `rules` every second.
    pub(crate) fn start(bin: &Path, dir: &Path, targets: &[u16], rules: &Path) -> Self {
        let port = super::free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: pipit\n    static_configs:\n      - targets: [{}]\n",
                rules.display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let mut p = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                let _ = s.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out.contains(" 200 ")
            });
            if ready {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "prometheus not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` on the API, parsed; panics unless the status is success.
    pub(crate) async fn api(&self, path: &str) -> serde_json::Value {
        let (port, path) = (self.port, path.to_string());
        let body = tokio::task::spawn_blocking(move || get(port, &path)).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["status"], "success", "{v}");
        v
    }

    /// An instant query's samples; panics on a query Prometheus refuses.
    pub(crate) async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(q))).await;
        match &v["data"]["result"] {
            serde_json::Value::Array(a) => a.clone(),
            // A scalar (or string) result: one value.
            other => vec![serde_json::json!({ "metric": {}, "value": other })],
        }
    }

    /// A query's result, one line per series, for the test's output.
    pub(crate) async fn show(&self, q: &str) -> String {
        let rows: Vec<String> = self
            .query(q)
            .await
            .iter()
            .map(|s| {
                let labels: Vec<String> = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "job")
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                format!("{{{}}} {}", labels.join(","), s["value"][1].as_str().unwrap_or(""))
            })
            .collect();
        if rows.is_empty() {
            "(empty)".into()
        } else {
            rows.join("\n  ")
        }
    }

    /// Waits until `q` returns a series, at most `limit`.
    pub(crate) async fn until(&self, q: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.query(q).await.is_empty() {
            if Instant::now() > deadline {
                let (up, stored) = (self.show("up").await, self.show("pipit_messages_stored_total").await);
                panic!("`{q}` still empty after {limit:?}; up:\n  {up}\nstored:\n  {stored}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
