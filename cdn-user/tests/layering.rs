//! The controller's folders form layers: each folder may use only the folders below it, so the
//! module graph has no cycle and a newcomer can read the code bottom-up. This test reads every
//! source file, collects the `crate::<folder>` paths it names outside its tests, and fails on any
//! use of a folder that is not below the user.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Bottom to top. A folder may use the folders listed before it.
const LAYERS: &[&str] = &[
    "config",
    "cluster",
    "dataplane",
    "bgp",
    "operator",
    "daemon",
];

#[test]
fn folders_only_use_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut uses: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (rank, folder) in LAYERS.iter().enumerate() {
        let dir = src.join(folder);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        let mut files = Vec::new();
        collect_rust_files(&dir, &mut files);
        // A folder's files may also sit beside it (`foo.rs` next to `foo/`), but the layered
        // folders are all `mod.rs` folders; the tree walk covers them.
        for file in files {
            // Tests may compose any layers (a real server to test a client, say); only the
            // code the daemon runs is layered.
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = fs::read_to_string(&file).expect("readable source file");
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            for used in crate_paths(code) {
                if used == *folder {
                    continue;
                }
                let used_rank = LAYERS.iter().position(|l| *l == used);
                assert!(
                    used_rank.is_some_and(|r| r < rank),
                    "{} uses crate::{used}, which is not a layer below {folder} (layers, bottom \
                     first: {LAYERS:?})",
                    file.display()
                );
                uses.entry(folder).or_default().insert(used);
            }
        }
    }
    // The layers do use each other: a parser that found nothing would pass vacuously.
    assert!(uses.get("daemon").is_some_and(|u| u.len() >= 4), "{uses:?}");
}

/// The XDP program's modules (one file each) use each other without a cycle, so it reads
/// top-down: entry, paths, then the pieces they are made of.
#[test]
fn the_xdp_program_has_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cdn-ebpf/src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in fs::read_dir(&src).expect("readable cdn-ebpf/src") {
        let path = entry.expect("directory entry").path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let text = fs::read_to_string(&path).expect("readable source file");
        let uses = crate_paths(&text)
            .into_iter()
            .filter(|used| used != module)
            .collect();
        graph.insert(module.to_string(), uses);
    }
    assert!(
        graph.contains_key("steer") && graph.contains_key("encap"),
        "{graph:?}"
    );
    // Peel off modules that use nothing left; whatever remains lies on a cycle.
    let mut left = graph.clone();
    while let Some(leaf) = left
        .iter()
        .find(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
        .map(|(m, _)| m.clone())
    {
        left.remove(&leaf);
    }
    assert!(left.is_empty(), "modules on an import cycle: {left:?}");
}

#[test]
fn the_scanner_sees_grouped_and_plain_paths() {
    let text = "use crate::{\n    bgp::announce::X,\n    cluster::{health::Y, sync},\n    config,\n};\n\
                fn f() { crate::operator::metrics::g(); }\n// crate::daemon in a comment\n";
    let found: BTreeSet<String> = crate_paths(text).into_iter().collect();
    let expected: BTreeSet<String> = ["bgp", "cluster", "config", "operator"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
}

fn collect_rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first path segment after every `crate::` outside comments, including each item of a
/// grouped `use crate::{a::.., b, ..}`.
fn crate_paths(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The top-level items of the group: split at commas outside nested braces.
            let mut depth = 0usize;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[j..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        found.push(leading_ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(leading_ident(rest));
        }
    }
    found.retain(|name| !name.is_empty() && name != "self");
    found
}

fn leading_ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}
