//! Captures log records per thread, so a test can check what was logged. `#[tokio::test]` runs
//! the test and every task it spawns on the test's own thread, so records of tests running in
//! parallel do not mix.

use std::{cell::RefCell, sync::OnceLock};

use log::{
    Level, Log, Metadata, Record,
    kv::{self, VisitSource},
};

thread_local! {
    static RECORDS: RefCell<Option<Vec<(Level, String)>>> = const { RefCell::new(None) };
}

struct Capture;

impl Log for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        // The message, then its key-value pairs as ` key=value` (values as they display).
        let mut message = record.args().to_string();
        let _ = record.key_values().visit(&mut Pairs(&mut message));
        // Also printed: the test harness shows it when the test fails.
        eprintln!("{} {}: {message}", record.level(), record.target());
        RECORDS.with(|r| {
            if let Some(records) = r.borrow_mut().as_mut() {
                records.push((record.level(), message));
            }
        });
    }

    fn flush(&self) {}
}

struct Pairs<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Pairs<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}

static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Starts capturing on this thread. Returns false if another logger was installed first, in
/// which case nothing is captured and the checks of log records must be skipped.
pub fn start() -> bool {
    let installed = *INSTALLED.get_or_init(|| {
        static LOGGER: Capture = Capture;
        let ok = log::set_logger(&LOGGER).is_ok();
        if ok {
            log::set_max_level(log::LevelFilter::Trace);
        }
        ok
    });
    if installed {
        RECORDS.with(|r| *r.borrow_mut() = Some(Vec::new()));
    } else {
        eprintln!("another logger is installed: skipping the checks of log records");
    }
    installed
}

/// The records captured on this thread so far with `level` that contain `text`.
pub fn matching(level: Level, text: &str) -> Vec<String> {
    RECORDS.with(|r| {
        r.borrow()
            .iter()
            .flatten()
            .filter(|(l, m)| *l == level && m.contains(text))
            .map(|(_, m)| m.clone())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_thread() {
        assert!(start());
        log::info!("on the test thread");
        log::warn!(member = "n2", checks = 3; "a warning");
        std::thread::spawn(|| {
            assert!(start());
            log::info!("on another thread");
            assert_eq!(matching(Level::Info, ""), ["on another thread"]);
        })
        .join()
        .expect("other thread");
        assert_eq!(matching(Level::Info, "thread"), ["on the test thread"]);
        assert_eq!(matching(Level::Warn, ""), ["a warning member=n2 checks=3"]);
        assert!(matching(Level::Error, "").is_empty());
        // Starting again starts afresh.
        assert!(start());
        assert!(matching(Level::Info, "").is_empty());
    }
}
