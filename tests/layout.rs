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

// ---------------------------------------------------------------------------
// Circles between files (house style 12) and the rules that keep the net
// layer thin. The graph is read from the text: every `crate::` and `super::`
// path (also inside grouped `use` trees) is an edge from its file to the
// file of the module it names. Test code is left out: items under
// `#[cfg(test)]`, and files declared by `#[cfg(test)] mod name;`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Known, to be removed by issue 20's reshaping. Each entry is one circle
/// as the sorted files it holds, in files this pass must not touch (other
/// work is editing them). The list may only shrink: an entry that no longer
/// matches a circle fails the test, so when a circle is broken or shrinks,
/// delete or narrow its entry here.
const KNOWN_CYCLES: &[(&str, &[&str])] = &[
    // `fanout::now_ms` as a clock, `groups::receives`, `receipts::Acked`,
    // receipts <-> forward: needs the shared names moved down a floor.
    (
        "src",
        &[
            "service/fanout.rs",
            "service/forward.rs",
            "service/group_receipts.rs",
            "service/groups.rs",
            "service/inbox.rs",
            "service/receipts.rs",
        ],
    ),
    // `impl Task` spread over sibling files in the client library.
    ("client/src", &["client/calls.rs", "client/connect.rs", "client/task.rs"]),
];

/// Known, to be removed by issue 20's reshaping: files that build a wire
/// error (`pb::Error {`) although `net/answers.rs` should be the only one.
/// Listed by file, not by line, so edits elsewhere in a file do not break
/// the list; it may only shrink, as above.
const KNOWN_WIRE_ERRORS: &[&str] = &["net/dispatch.rs"];

/// Known, to be removed by issue 20's reshaping: `net/` files that name the
/// storage or commit layers instead of the services' own error types. It
/// may only shrink, as above.
const KNOWN_NET_NAMES_STORE: &[&str] = &["net/dispatch.rs", "net/mod.rs"];

/// The source with comments removed and string and char literals blanked,
/// so neither a doc link nor a message text reads as a path.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, 0);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if rest[0] == b'r' && (rest.starts_with(b"r\"") || rest.starts_with(b"r#")) && !ident_byte(b, i) {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let start = 2 + hashes;
            let end = rest[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| start + p + close.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('a', '\n', '\u{..}'), or else a lifetime.
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(2 + ch)
            };
            match end {
                Some(end) => {
                    blank(&mut out, &rest[..end]);
                    i += end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Removes each item under `#[cfg(test)]` (a block is matched by braces)
/// and returns the names of test-only child files it declares
/// (`#[cfg(test)] mod name;`).
fn without_tests(code: &str) -> (String, Vec<String>) {
    let mut out = code.to_string();
    let mut test_children = Vec::new();
    while let Some(at) = out.find("#[cfg(test)]") {
        let b = out.as_bytes();
        let mut j = at + "#[cfg(test)]".len();
        let mut end = b.len();
        while j < b.len() {
            match b[j] {
                b';' => {
                    end = j + 1;
                    break;
                }
                b'{' => {
                    let mut depth = 0usize;
                    while j < b.len() {
                        match b[j] {
                            b'{' => depth += 1,
                            b'}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    end = (j + 1).min(b.len());
                    break;
                }
                _ => j += 1,
            }
        }
        let item = out[at..end].to_string();
        let words: Vec<&str> =
            item.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
        if item.ends_with(';') {
            if let Some(p) = words.iter().position(|w| *w == "mod") {
                if let Some(name) = words.get(p + 1) {
                    test_children.push(name.to_string());
                }
            }
        }
        out.replace_range(at..end, &" ".repeat(end - at));
    }
    (out, test_children)
}

/// One crate's source tree: module path -> (file relative to the root, code
/// without tests), test-only files left out.
struct Tree {
    modules: BTreeMap<Vec<String>, (String, String)>,
}

fn module_path(rel: &Path) -> Vec<String> {
    let mut segs: Vec<String> =
        rel.with_extension("").components().map(|c| c.as_os_str().to_str().unwrap().to_string()).collect();
    if matches!(segs.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        segs.pop();
    }
    segs
}

fn read_tree(root: PathBuf) -> Tree {
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut all = BTreeMap::new();
    let mut test_only: BTreeSet<Vec<String>> = BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap().to_path_buf();
        let module = module_path(&rel);
        let (code, children) = without_tests(&code_only(&std::fs::read_to_string(&file).unwrap()));
        for child in children {
            let mut m = module.clone();
            m.push(child);
            test_only.insert(m);
        }
        all.insert(module, (rel.to_str().unwrap().to_string(), code));
    }
    let modules = all.into_iter().filter(|(m, _)| !test_only.iter().any(|t| m.starts_with(t))).collect();
    Tree { modules }
}

/// Every path that starts with `crate::` or `super::`, as segments, with
/// grouped `use` trees expanded (`crate::a::{b, c::d}` gives `crate a b`
/// and `crate a c d`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let b = code.as_bytes();
    for start in ["crate::", "super::"] {
        for (i, _) in code.match_indices(start) {
            if ident_byte(b, i) || (i >= 2 && &code[i - 2..i] == "::") {
                continue;
            }
            let head = start.trim_end_matches("::").to_string();
            use_tree(&code[i + start.len()..], vec![head], &mut found);
        }
    }
    found
}

/// Reads one use tree after `prefix::` and pushes each leaf path.
fn use_tree<'a>(mut s: &'a str, mut prefix: Vec<String>, found: &mut Vec<Vec<String>>) -> &'a str {
    loop {
        s = s.trim_start();
        if let Some(inner) = s.strip_prefix('{') {
            let mut rest = inner;
            loop {
                rest = rest.trim_start();
                if let Some(r) = rest.strip_prefix('}') {
                    return r;
                }
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                    continue;
                }
                let before = rest.len();
                rest = use_tree(rest, prefix.clone(), found);
                if rest.len() == before {
                    // Not a use tree after all; stop reading it.
                    return rest;
                }
            }
        }
        if let Some(r) = s.strip_prefix('*') {
            found.push(prefix);
            return r;
        }
        let name: String = s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            found.push(prefix);
            return s;
        }
        s = &s[name.len()..];
        if name != "self" {
            prefix.push(name);
        }
        match s.trim_start().strip_prefix("::") {
            Some(r) => s = r,
            None => {
                found.push(prefix);
                return s;
            }
        }
    }
}

/// The module file a path lands in: the longest prefix that is a module.
fn resolve(tree: &Tree, from: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = Vec::new();
    let mut segs = path;
    if segs.first().map(String::as_str) == Some("super") {
        base = from.to_vec();
        while segs.first().map(String::as_str) == Some("super") {
            base.pop()?;
            segs = &segs[1..];
        }
    } else {
        segs = &segs[1..];
    }
    base.extend(segs.iter().cloned());
    (1..=base.len()).rev().map(|k| base[..k].to_vec()).find(|m| tree.modules.contains_key(m))
}

/// Circles of more than one file, each as its sorted files.
fn cycles(tree: &Tree) -> Vec<Vec<String>> {
    let names: Vec<&Vec<String>> = tree.modules.keys().collect();
    let index: BTreeMap<&Vec<String>, usize> = names.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut edges = vec![BTreeSet::new(); names.len()];
    for (i, m) in names.iter().enumerate() {
        for p in paths(&tree.modules[*m].1) {
            if let Some(t) = resolve(tree, m, &p) {
                if &t != *m {
                    edges[i].insert(index[&t]);
                }
            }
        }
    }
    // Tarjan's strongly connected components.
    struct S {
        next: usize,
        idx: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on: Vec<bool>,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, edges: &[BTreeSet<usize>], s: &mut S) {
        s.idx[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on[v] = true;
        for &w in &edges[v] {
            match s.idx[w] {
                None => {
                    visit(w, edges, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.idx[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let n = names.len();
    let mut s =
        S { next: 0, idx: vec![None; n], low: vec![0; n], stack: Vec::new(), on: vec![false; n], out: Vec::new() };
    for v in 0..n {
        if s.idx[v].is_none() {
            visit(v, &edges, &mut s);
        }
    }
    let mut out: Vec<Vec<String>> = s
        .out
        .into_iter()
        .map(|c| {
            let mut files: Vec<String> = c.into_iter().map(|i| tree.modules[names[i]].0.clone()).collect();
            files.sort();
            files
        })
        .collect();
    out.sort();
    out
}

/// Checks one crate's circles against its part of `KNOWN_CYCLES`.
fn check_cycles(label: &str, root: PathBuf, problems: &mut Vec<String>) {
    let tree = read_tree(root);
    let found = cycles(&tree);
    let known: Vec<Vec<String>> = KNOWN_CYCLES
        .iter()
        .filter(|(l, _)| *l == label)
        .map(|(_, f)| f.iter().map(|s| s.to_string()).collect())
        .collect();
    for c in &found {
        if !known.contains(c) {
            problems.push(format!("{label}: cycle of {} files: {}", c.len(), c.join(", ")));
        }
    }
    for k in &known {
        if !found.contains(k) {
            problems.push(format!(
                "{label}: allowlisted cycle no longer exists, remove or narrow it in KNOWN_CYCLES: {}",
                k.join(", ")
            ));
        }
    }
    let globs: BTreeSet<String> =
        tree.modules.values().filter(|(_, code)| code.contains("use super::*")).map(|(file, _)| file.clone()).collect();
    check_files(label, "has `use super::*` outside tests", &globs, &[], problems);
}

/// Checks a file rule against its allowlist: files that break it and are
/// not listed, and listed files that no longer break it.
fn check_files(label: &str, rule: &str, hits: &BTreeSet<String>, known: &[&str], problems: &mut Vec<String>) {
    for f in hits {
        if !known.contains(&f.as_str()) {
            problems.push(format!("{label}/{f} {rule}"));
        }
    }
    for k in known {
        if !hits.contains(*k) {
            problems.push(format!("{label}/{k} no longer {rule}: remove it from the allowlist"));
        }
    }
}

#[test]
fn no_circles_between_files_and_net_stays_thin() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    check_cycles("src", manifest.join("src"), &mut problems);

    let tree = read_tree(manifest.join("src"));
    let mut wire_errors = BTreeSet::new();
    let mut store_names = BTreeSet::new();
    for (file, code) in tree.modules.values() {
        let flat: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
        if file != "net/answers.rs" && flat.contains("pb::Error {") {
            wire_errors.insert(file.clone());
        }
        if file.starts_with("net/")
            && paths(code)
                .iter()
                .any(|p| p[0] == "crate" && matches!(p.get(1).map(String::as_str), Some("store" | "commit")))
        {
            store_names.insert(file.clone());
        }
    }
    check_files(
        "src",
        "builds a wire error (`pb::Error {`) outside net/answers.rs",
        &wire_errors,
        KNOWN_WIRE_ERRORS,
        &mut problems,
    );
    check_files("src", "(net) names crate::store or crate::commit", &store_names, KNOWN_NET_NAMES_STORE, &mut problems);
    assert!(problems.is_empty(), "house rules broken:\n{}", problems.join("\n"));
}

#[test]
fn no_circles_between_client_library_files() {
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("client/src");
    let mut problems = Vec::new();
    check_cycles("client/src", client, &mut problems);
    assert!(problems.is_empty(), "house rules broken:\n{}", problems.join("\n"));
}

#[test]
fn the_path_reader_sees_grouped_uses_and_skips_comments_and_strings() {
    let code = code_only("use crate::a::{b, c::{d, self}};\n// crate::x\nlet s = \"super::y\"; let c = '{'; fn f<'a>() { super::z::w(); }");
    let mut p = paths(&code);
    p.sort();
    let want: Vec<Vec<&str>> =
        vec![vec!["crate", "a", "b"], vec!["crate", "a", "c"], vec!["crate", "a", "c", "d"], vec!["super", "z", "w"]];
    assert_eq!(p, want);
    let (rest, children) =
        without_tests("fn a() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n#[cfg(test)]\nmod more;\n");
    assert!(!rest.contains("super"));
    assert_eq!(children, vec!["more".to_string()]);
}
