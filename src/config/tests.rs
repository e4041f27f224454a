use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::*;

const EXAMPLE: &str = include_str!("../../systemd/pipit.toml");

fn parse(text: &str) -> Result<Parsed, ConfigError> {
    Config::parse(text, Path::new("pipit.toml"))
}

fn error(text: &str) -> String {
    parse(text).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("accepted: {text}"))
}

/// What systemd/pipit.toml sets on purpose: a system install's paths.
fn example_settings() -> Config {
    Config {
        data_dir: "/var/lib/pipit".into(),
        metrics_listen: Some("127.0.0.1:9322".parse().unwrap()),
        ..Config::default()
    }
}

/// The example with every commented-out setting (`#key = value`, `#[table]`,
/// also with one space after the `#`) made live.
fn uncomment(text: &str) -> String {
    let setting = |b: &str| {
        let name = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_lowercase() || c == b'_');
        b.strip_prefix('[').and_then(|b| b.strip_suffix(']')).is_some_and(name)
            || b.split_once(" = ").is_some_and(|(k, _)| name(k))
    };
    let live = |l: &str| {
        let body = l.strip_prefix("# ").or_else(|| l.strip_prefix('#'))?;
        setting(body).then(|| body.to_string())
    };
    text.lines().map(|l| live(l).unwrap_or_else(|| l.to_string()) + "\n").collect()
}

#[test]
fn the_new_form_is_read_into_each_table() {
    let text =
        "listen = \"127.0.0.1:6000\"\nshards = 2\n\n[net]\ndelivery_window = 8\nhandshake_rate_per_source = 0\n\n\
                [storage]\nqueue = 100\n\n[accounts]\nregistration = \"invite\"\n\n[messages]\nttl_secs = 60\n\n\
                [groups]\nmax_members = 4\n\n[presence]\ngrace_ms = 250\n\n[typing]\nburst = 2\n\n\
                [push]\nunifiedpush = true\n\n[keys]\nfetch_burst = 5\n";
    let p = parse(text).unwrap();
    assert!(p.deprecated.is_empty());
    let c = p.config;
    assert_eq!((c.listen.port(), c.shards), (6000, 2));
    assert_eq!((c.net.delivery_window, c.net.handshake_rate_per_source), (8, 0));
    assert_eq!(c.net.max_connections, NetSettings::default().max_connections);
    assert_eq!(c.storage.queue, 100);
    assert_eq!(c.accounts.registration, Registration::Invite);
    assert_eq!(c.messages.ttl_secs, 60);
    assert_eq!(c.groups.max_members, 4);
    assert_eq!(c.presence.grace_ms, 250);
    assert_eq!(c.typing.burst, 2);
    assert!(c.push.unifiedpush);
    assert_eq!(c.keys.fetch_burst, 5);
    assert_eq!(parse("").unwrap().config, Config::default());
}

#[test]
fn flat_keys_still_work_each_with_a_warning_naming_its_new_key() {
    let p = parse("delivery_window = 8\nstorage_queue = 100\npush_interval_secs = 5\n\n[net]\nmax_connections = 3\n")
        .unwrap();
    assert_eq!(p.config.net.delivery_window, 8);
    assert_eq!(p.config.net.max_connections, 3);
    assert_eq!(p.config.storage.queue, 100);
    assert_eq!(p.config.push.interval_secs, 5);
    let said: Vec<String> = p.deprecated.iter().map(ToString::to_string).collect();
    assert_eq!(
        said,
        [
            "config: `delivery_window` is deprecated; use `[net] delivery_window`",
            "config: `storage_queue` is deprecated; use `[storage] queue`",
            "config: `push_interval_secs` is deprecated; use `[push] interval_secs`",
        ]
    );
}

#[test]
fn loading_a_file_with_flat_keys_logs_each_warning_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipit.toml");
    std::fs::write(&path, "registration = \"invite\"\ntyping_burst = 2\n").unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer({
            let log = log.clone();
            move || Capture(log.clone())
        })
        .finish();
    let cfg = tracing::subscriber::with_default(subscriber, || Config::load(&path)).unwrap();
    assert_eq!((cfg.accounts.registration, cfg.typing.burst), (Registration::Invite, 2));
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    for line in [
        "config: `registration` is deprecated; use `[accounts] registration`",
        "config: `typing_burst` is deprecated; use `[typing] burst`",
    ] {
        assert_eq!(log.matches(line).count(), 1, "{log}");
    }
    assert_eq!(log.lines().filter(|l| l.contains("WARN")).count(), 2, "{log}");
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_setting_given_both_ways_is_refused_naming_both() {
    let err = error("delivery_window = 8\n[net]\ndelivery_window = 9\n");
    assert_eq!(
        err,
        "config: `delivery_window` and `[net] delivery_window` are the same setting; give it once, as `[net] delivery_window`"
    );
    let err = error("push_queue = 1\n[push]\nqueue = 2\n");
    assert!(err.contains("`push_queue` and `[push] queue`"), "{err}");
}

#[test]
fn unknown_keys_and_tables_are_refused_by_name() {
    for (text, name) in [
        ("lisen = \"1.2.3.4:5\"\n", "lisen"),
        ("[net]\ndelivery_windw = 3\n", "delivery_windw"),
        // The flat spelling inside its table is not the new key.
        ("[push]\npush_queue = 3\n", "push_queue"),
        ("[nett]\ndelivery_window = 3\n", "nett"),
        // With flat keys moved, the rest is still checked.
        ("delivery_window = 3\n[storage]\nbogus = 1\n", "bogus"),
        ("[cluster]\nnode_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = []\nfoo = 1\n", "foo"),
    ] {
        let err = error(text);
        assert!(err.contains(&format!("`{name}`")), "{text}: {err}");
    }
    // As the binary prints it (the whole chain): said once.
    let chain = format!("{:#}", anyhow::Error::from(parse("lisen = 1\n").unwrap_err()));
    assert_eq!(chain.matches("unknown field").count(), 1, "{chain}");
}

#[test]
fn values_out_of_range_are_refused_naming_the_new_key() {
    assert!(error("[net]\ndelivery_window = 0\n").contains("[net] delivery_window"));
    // Through the flat key too: the operator learns the new name.
    assert!(error("delivery_window = 0\n").contains("[net] delivery_window"));
    assert!(error("[groups]\nmax_members = 2000\n").contains("[groups] max_members"));
}

#[test]
fn a_storage_reserve_below_what_a_restart_needs_is_refused_with_the_minimum() {
    for text in ["[storage]\nreserve_mb = 0\n", "storage_reserve_mb = 0\n", "[storage]\nreserve_mb = 63\n"] {
        let e = error(text);
        assert!(e.contains("[storage] reserve_mb") && e.contains("below the minimum of 64"), "{text}: {e}");
    }
    assert_eq!(parse("[storage]\nreserve_mb = 64\n").unwrap().config.storage.reserve_mb, 64);
}

#[test]
fn the_example_file_shows_every_setting_at_its_default() {
    let parsed = parse(EXAMPLE).unwrap();
    assert!(parsed.deprecated.is_empty(), "{:?}", parsed.deprecated);
    assert_eq!(parsed.config, example_settings());

    // Every commented-out value is the default: made live, nothing changes
    // but the example cluster.
    let live = uncomment(EXAMPLE);
    let mut cfg = parse(&live).unwrap_or_else(|e| panic!("{e}\n{live}")).config;
    let cluster = cfg.cluster.take().expect("the example shows [cluster]");
    assert_eq!(cfg, example_settings());
    let minimal = format!(
        "[cluster]\nnode_id = {:?}\nadvertise = {:?}\nlink_listen = \"{}\"\netcd_endpoints = {:?}\n",
        cluster.node_id, cluster.advertise, cluster.link_listen, cluster.etcd_endpoints
    );
    assert_eq!(parse(&minimal).unwrap().config.cluster, Some(cluster.clone()), "[cluster] defaults");

    // And every setting is there.
    let shown: toml::Table = toml::from_str(&live).unwrap();
    let mut all = toml::Table::try_from(Config::default()).unwrap();
    all.insert("cluster".into(), toml::Value::try_from(&cluster).unwrap());
    all.insert("metrics_listen".into(), toml::Value::String(String::new()));
    let mut missing = Vec::new();
    for (key, value) in &all {
        match value.as_table() {
            Some(table) => missing.extend(
                table
                    .keys()
                    .filter(|k| shown.get(key).and_then(|t| t.get(k.as_str())).is_none())
                    .map(|k| format!("[{key}] {k}")),
            ),
            None if !shown.contains_key(key) => missing.push(key.clone()),
            None => {}
        }
    }
    assert!(missing.is_empty(), "systemd/pipit.toml does not show {missing:?}");
}

#[test]
fn the_last_releases_example_still_reads_to_the_same_settings() {
    let old = parse(include_str!("flat.toml")).unwrap();
    assert_eq!(old.config, example_settings());
    // Every flat key it set was moved, and said so.
    let set: BTreeSet<&str> = old.deprecated.iter().map(|d| d.old).collect();
    assert_eq!(set.len(), old.deprecated.len());
    assert_eq!(set.len(), 48, "{set:?}");
}

#[test]
fn every_flat_key_has_a_place_in_a_table() {
    let all = toml::Table::try_from(Config::default()).unwrap();
    let mut olds = BTreeSet::new();
    let mut news = BTreeSet::new();
    for d in flat::all() {
        assert!(olds.insert(d.old), "{} twice", d.old);
        assert!(news.insert((d.table, d.key)), "[{}] {} twice", d.table, d.key);
        assert!(all.get(d.table).and_then(|t| t.get(d.key)).is_some(), "{d}: no such setting");
        assert!(!all.contains_key(d.old), "{} is still a top-level key", d.old);
    }
    // Every table's settings had a flat key before, but those added since.
    let added_since = [
        ("net", "handshake_idle_timeout_ms"),
        ("net", "handshake_step_timeout_ms"),
        ("net", "max_handshakes_per_source"),
    ];
    for (table, key) in added_since {
        assert!(all.get(table).and_then(|t| t.get(key)).is_some() && !news.contains(&(table, key)), "[{table}] {key}");
    }
    let sectioned: usize = all.values().filter_map(toml::Value::as_table).map(toml::Table::len).sum();
    assert_eq!(news.len() + added_since.len(), sectioned);
}

#[test]
fn the_cluster_example_reads() {
    let c = parse(include_str!("../../systemd/pipit-cluster-node.toml")).unwrap().config;
    assert_eq!(c.cluster.as_ref().unwrap().link_address().as_deref(), Some("chat1.example.net:5223"));
}

#[test]
fn the_cluster_table_is_checked() {
    let ok = parse(
        "[cluster]\nnode_id = \"n1\"\nadvertise = \"chat1.example:5222\"\nlink_listen = \"10.0.0.1:5223\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
    )
    .unwrap()
    .config;
    let c = ok.cluster.as_ref().unwrap();
    assert_eq!((c.etcd_prefix.as_str(), c.lease_secs), ("/pipit", 10));
    assert_eq!(c.advertise_host_port(), Some(("chat1.example", 5222)));
    assert_eq!(c.link_address().as_deref(), Some("chat1.example:5223"));
    for (bad, key) in [
        ("node_id = \"N 1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\n", "node_id"),
        ("node_id = \"n1\"\nadvertise = \"h\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\n", "advertise"),
        ("node_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = []\n", "etcd_endpoints"),
        (
            "node_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\nlease_secs = 1\n",
            "lease_secs",
        ),
    ] {
        let err = error(&format!("[cluster]\n{bad}"));
        assert!(err.starts_with(&format!("[cluster] {key}")), "{err}");
    }
}
