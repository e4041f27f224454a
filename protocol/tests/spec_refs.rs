//! Every section that `pipit.proto`, `node.proto` and SPEC.md itself cite
//! exists in SPEC.md: a reader following "SPEC.md 13.6" must not find
//! nothing there (issue 21, defect 11).

use std::collections::BTreeSet;

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The section numbers of SPEC.md's headings: `## 5. Messages` is `5`,
/// `### 5.10 Features` is `5.10`.
fn sections(spec: &str) -> BTreeSet<String> {
    spec.lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .filter_map(|h| h.split_whitespace().next())
        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        .map(|n| n.trim_end_matches('.').to_string())
        .collect()
}

/// The section numbers cited after each `marker` in `text`.
fn cited(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let n: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let n = n.trim_end_matches('.');
            (!n.is_empty()).then(|| n.to_string())
        })
        .collect()
}

#[test]
fn every_cited_section_exists() {
    let spec = read("SPEC.md");
    let known = sections(&spec);
    assert!(known.contains("5.10") && known.contains("13.4"), "{known:?}");
    let mut missing = Vec::new();
    for (file, marker) in [("pipit.proto", "SPEC.md "), ("node.proto", "SPEC.md "), ("SPEC.md", "§")] {
        let text = if file == "SPEC.md" { spec.clone() } else { read(file) };
        for n in cited(&text, marker) {
            if !known.contains(&n) {
                missing.push(format!("{file} cites {marker}{n}"));
            }
        }
    }
    assert!(missing.is_empty(), "sections that do not exist: {missing:?}");
}
