//! The server's layering rule, as written at the top of `src/lib.rs`:
//! each module imports only modules below it, and only `store/` names
//! RocksDB. Checked from the source so a new file cannot quietly break it.

use std::path::Path;

/// Modules from the bottom up. `keys` (the key files) may be used by any
/// layer; it imports nothing of the server. `config` gathers the settings
/// table each layer defines, so it sits above them all.
const LAYERS: [&str; 9] = ["model", "store", "commit", "route", "service", "net", "admin", "config", "server"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == module)
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn each_module_imports_only_modules_below_it_and_only_store_names_rocksdb() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs").to_string();
        // Code only: comments may point anywhere.
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        if top != "store" && text.contains("rocksdb::") {
            violations.push(format!("{} names RocksDB", rel.display()));
        }
        let Some(own) = rank(&top) else {
            if top == "keys" && text.contains("crate::") {
                violations.push(format!("{top} imports from the server"));
            }
            continue;
        };
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if let Some(r) = rank(&name) {
                if r > own {
                    violations.push(format!("{} ({top}) imports {name}, which is above it", rel.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "layering broken:\n{}", violations.join("\n"));
}
