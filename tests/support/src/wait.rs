//! Waiting for a condition with a deadline, from plain and from async code.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// How often the condition is checked.
const POLL: Duration = Duration::from_millis(20);

/// Checks `check` until it returns true; fails after `limit`, with `what` and the latest error
/// `check` returned (an error does not end the wait: the thing checked may not be up yet).
pub fn until(limit: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut latest_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => latest_error = Some(e),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {limit:?} waiting for {what}{}",
                describe(latest_error)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// [`until`] for async checks, sleeping on the tokio timer in between.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut latest_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => latest_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {limit:?} waiting for {what}{}",
                describe(latest_error)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn describe(latest_error: Option<anyhow::Error>) -> String {
    latest_error
        .map(|e| format!(" (latest error: {e:#})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    #[test]
    fn succeeds_once_true_and_fails_with_the_latest_error() {
        let mut n = 0;
        until(Duration::from_secs(5), "third check", || {
            n += 1;
            Ok(n == 3)
        })
        .expect("true on the third check");
        assert_eq!(n, 3);

        // The latest error is kept even when later checks only return false.
        let started = Instant::now();
        let mut n = 0;
        let e = until(Duration::from_millis(100), "never", || {
            n += 1;
            match n {
                1 => Err(anyhow!("first")),
                2 => Err(anyhow!("second")),
                _ => Ok(false),
            }
        })
        .expect_err("never true");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(n > 3, "{n} checks");
        assert_eq!(
            e.to_string(),
            "timed out after 100ms waiting for never (latest error: second)"
        );
        let e = until(Duration::ZERO, "false", || Ok(false)).expect_err("false");
        assert_eq!(e.to_string(), "timed out after 0ns waiting for false");
    }

    #[test]
    fn eventually_polls_an_async_check() -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        runtime.block_on(async {
            let mut n = 0;
            eventually("third check", Duration::from_secs(5), || {
                n += 1;
                let done = n == 3;
                async move { Ok(done) }
            })
            .await?;
            assert_eq!(n, 3);
            let e = eventually("never", Duration::from_millis(50), || async {
                Err(anyhow!("down"))
            })
            .await
            .expect_err("never true");
            assert!(e.to_string().ends_with("(latest error: down)"), "{e}");
            Ok(())
        })
    }
}
