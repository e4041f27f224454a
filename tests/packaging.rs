//! The Debian package's metadata (`[package.metadata.deb]` in Cargo.toml,
//! `deploy/debian/`) against the files it packages, so that moving a file
//! or renaming a binary breaks a test rather than `tools/dev deb` on the
//! day of a release. (Building the package needs a release build; README,
//! "Installing", says how, and what it was seen to contain.)

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml")).unwrap().parse().unwrap();
    manifest["package"]["metadata"]["deb"].as_table().unwrap().clone()
}

/// (source, destination) of every asset.
fn assets() -> Vec<(String, String)> {
    deb_metadata()["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (a[0].as_str().unwrap().to_string(), a[1].as_str().unwrap().to_string())
        })
        .collect()
}

/// Every `[[bin]]` name in the workspace's manifests.
fn workspace_binaries() -> Vec<String> {
    let mut out = Vec::new();
    for manifest in ["Cargo.toml", "tools/Cargo.toml"] {
        let m: toml::Table = std::fs::read_to_string(root().join(manifest)).unwrap().parse().unwrap();
        for b in m.get("bin").and_then(|b| b.as_array()).into_iter().flatten() {
            out.push(b["name"].as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn every_asset_exists_and_the_binaries_are_built_by_the_workspace() {
    let bins = workspace_binaries();
    let mut dests = Vec::new();
    for (source, dest) in assets() {
        if let Some(bin) = source.strip_prefix("target/release/") {
            assert!(bins.iter().any(|b| b == bin), "{bin} is no [[bin]] of the workspace ({bins:?})");
        } else {
            assert!(root().join(&source).is_file(), "asset {source} does not exist");
        }
        let name = Path::new(&source).file_name().unwrap().to_str().unwrap();
        dests.push(if dest.ends_with('/') { format!("/{dest}{name}") } else { format!("/{dest}") });
    }
    for wanted in ["/usr/bin/pipit", "/usr/bin/pipit-cli", "/etc/pipit/pipit.toml", "/usr/lib/sysctl.d/99-pipit.conf"] {
        assert!(dests.iter().any(|d| d == wanted), "the package lacks {wanted}: {dests:?}");
    }
}

#[test]
fn the_unit_runs_the_packaged_binary_on_the_packaged_config_as_the_packaged_user() {
    let unit = std::fs::read_to_string(root().join("systemd/pipit.service")).unwrap();
    assert!(unit.lines().any(|l| l == "ExecStart=/usr/bin/pipit serve --config /etc/pipit/pipit.toml"), "{unit}");
    assert!(unit.lines().any(|l| l == "User=pipit") && unit.lines().any(|l| l == "StateDirectory=pipit"));
    let units = deb_metadata()["systemd-units"]["unit-scripts"].as_str().unwrap().to_string();
    assert!(root().join(units).join("pipit.service").is_file());
    // The packaged config keeps its data where the unit's StateDirectory is.
    let config = std::fs::read_to_string(root().join("systemd/pipit.toml")).unwrap();
    assert!(config.lines().any(|l| l == "data_dir = \"/var/lib/pipit\""));
    let postinst = std::fs::read_to_string(root().join("deploy/debian/postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system --group --home /var/lib/pipit"),
        "the user's home is the data directory"
    );
    assert!(deb_metadata()["depends"].as_str().unwrap().contains("adduser"), "postinst runs adduser");
}

#[test]
fn the_maintainer_script_is_executable_posix_sh() {
    use std::os::unix::fs::PermissionsExt as _;
    let path = root().join("deploy/debian/postinst");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o111, 0o111, "postinst must be executable");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("#!/bin/sh\n") && text.contains("#DEBHELPER#"),
        "cargo-deb appends the unit's part at #DEBHELPER#"
    );
    let out = std::process::Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(out.status.success(), "sh -n postinst: {}", String::from_utf8_lossy(&out.stderr));
}
