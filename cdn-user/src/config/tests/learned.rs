//! `cluster.learned_idle_ms`.

use super::*;

#[test]
fn learned_idle_defaults_to_thirty_seconds() {
    let cfg = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.cluster.learned_idle, Duration::from_secs(30));
}

#[test]
fn learned_idle_is_read_in_milliseconds() {
    let text = example_with(&[("# learned_idle_ms = 30000", "learned_idle_ms = 1500")]);
    let cfg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.cluster.learned_idle, Duration::from_millis(1500));
}

#[test]
fn learned_idle_outside_its_range_is_rejected() {
    for bad in ["999", "0", "3600001"] {
        let text = example_with(&[(
            "# learned_idle_ms = 30000",
            &format!("learned_idle_ms = {bad}"),
        )]);
        assert_problem(&text, "cluster.learned_idle_ms", "outside 1000..=3600000");
    }
    for good in ["1000", "3600000"] {
        let text = example_with(&[(
            "# learned_idle_ms = 30000",
            &format!("learned_idle_ms = {good}"),
        )]);
        parse(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn learned_idle_changes_the_digest_only_when_not_the_default() {
    let base = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let same = parse(&example_with(&[(
        "# learned_idle_ms = 30000",
        "learned_idle_ms = 30000",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    let other = parse(&example_with(&[(
        "# learned_idle_ms = 30000",
        "learned_idle_ms = 5000",
    )]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(digest::cluster_digest(&base), digest::cluster_digest(&same));
    assert_ne!(
        digest::cluster_digest(&base),
        digest::cluster_digest(&other)
    );
}
