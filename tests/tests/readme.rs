//! The README stays true: its configuration example is the one the code documents and checks,
//! and its table of keys is the code's table of keys.

use std::collections::BTreeMap;

use cdn_user::config::{self, FIELDS};

const README: &str = include_str!("../../README.md");

#[test]
fn readme_configuration_example_is_the_checked_example() {
    let start = README
        .find("```toml\n")
        .expect("the README has a TOML example")
        + "```toml\n".len();
    let len = README[start..].find("```").expect("the TOML example ends");
    let example = &README[start..start + len];
    assert_eq!(
        example,
        config::EXAMPLE,
        "README example differs from cdn-user/src/config/example.toml"
    );
    config::parse(example).expect("the README example is a valid configuration");
}

/// The BIRD snippet the Debian package installs (`/usr/share/cdn-steer/bird/`) is the README's.
#[test]
fn readme_bird_snippet_is_the_packaged_one() {
    let section = &README[README
        .find("### BIRD\n")
        .expect("the README has a BIRD section")..];
    let start = section.find("```text\n").expect("with a snippet") + "```text\n".len();
    let len = section[start..].find("```").expect("the snippet ends");
    assert_eq!(
        &section[start..start + len],
        include_str!("../../packaging/bird/cdn-steer.conf"),
        "the README's BIRD snippet differs from packaging/bird/cdn-steer.conf"
    );
}

/// The README's table of keys: key → (default, on reload).
fn readme_keys() -> BTreeMap<String, (String, String)> {
    const HEADER: &str = "| key | default | on reload | meaning |\n|---|---|---|---|\n";
    let start = README
        .find(HEADER)
        .expect("the README has the table of keys")
        + HEADER.len();
    let mut keys = BTreeMap::new();
    for line in README[start..].lines().take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let [key, default, reload, _meaning] = cells[..] else {
            panic!("README table row without four cells: {line}");
        };
        let key = key
            .strip_prefix('`')
            .and_then(|k| k.strip_suffix('`'))
            .unwrap_or_else(|| panic!("README table key not in backquotes: {line}"));
        let previous = keys.insert(key.to_owned(), (default.to_owned(), reload.to_owned()));
        assert!(previous.is_none(), "README lists {key} twice");
    }
    keys
}

#[test]
fn readme_table_of_keys_is_the_schema() {
    let mut readme = readme_keys();
    let mut wrong = Vec::new();
    for field in FIELDS {
        let default = field.when_absent.describe();
        let reload = if field.restart_only() {
            "restart"
        } else {
            "live"
        };
        match readme.remove(field.path) {
            None => wrong.push(format!(
                "missing row: | `{}` | {default} | {reload} | … |",
                field.path
            )),
            Some(row) if row != (default.clone(), reload.to_owned()) => wrong.push(format!(
                "{}: README says default {}, {}; the code: {default}, {reload}",
                field.path, row.0, row.1
            )),
            Some(_) => {}
        }
    }
    for key in readme.keys() {
        wrong.push(format!("README documents {key}, which is not a key"));
    }
    assert!(
        wrong.is_empty(),
        "README table of keys:\n{}",
        wrong.join("\n")
    );
}
