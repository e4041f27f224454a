use super::*;

const EXAMPLE: &str = include_str!("../../systemd/pipit.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
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
    let c = parse(text).unwrap();
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
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn unknown_keys_and_tables_are_refused_by_name() {
    for (text, name) in [
        ("lisen = \"1.2.3.4:5\"\n", "lisen"),
        ("[net]\ndelivery_windw = 3\n", "delivery_windw"),
        // The flat spelling inside its table is not the new key.
        ("[push]\npush_queue = 3\n", "push_queue"),
        ("[nett]\ndelivery_window = 3\n", "nett"),
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
    assert!(error("[groups]\nmax_members = 2000\n").contains("[groups] max_members"));
}

#[test]
fn the_example_file_shows_every_setting_at_its_default() {
    assert_eq!(parse(EXAMPLE).unwrap(), example_settings());

    // Every commented-out value is the default: made live, nothing changes
    // but the example cluster.
    let live = uncomment(EXAMPLE);
    let mut cfg = parse(&live).unwrap_or_else(|e| panic!("{e}\n{live}"));
    let cluster = cfg.cluster.take().expect("the example shows [cluster]");
    assert_eq!(cfg, example_settings());
    let minimal = format!(
        "[cluster]\nnode_id = {:?}\nadvertise = {:?}\nlink_listen = \"{}\"\netcd_endpoints = {:?}\n",
        cluster.node_id, cluster.advertise, cluster.link_listen, cluster.etcd_endpoints
    );
    assert_eq!(parse(&minimal).unwrap().cluster, Some(cluster.clone()), "[cluster] defaults");

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
fn the_cluster_example_reads() {
    let c = parse(include_str!("../../systemd/pipit-cluster-node.toml")).unwrap();
    assert_eq!(c.cluster.as_ref().unwrap().link_address().as_deref(), Some("chat1.example.net:5223"));
}

#[test]
fn the_cluster_table_is_checked() {
    let ok = parse(
        "[cluster]\nnode_id = \"n1\"\nadvertise = \"chat1.example:5222\"\nlink_listen = \"10.0.0.1:5223\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
    )
    .unwrap();
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
