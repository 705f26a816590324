//! Helpers shared by the integration tests: unique names, settings for a test server, and
//! waiting on a condition with a deadline.
//!
//! Talks to nothing itself; the tests pass it a server URL from `deltasync-testkit`.

use deltasync_shared::settings::{Settings, StorageKind};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A pipeline name no other test (in this or a concurrent run) uses.
pub fn unique_pipeline(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Validated default settings pointed at `url`, for pipeline `pipeline`, file storage.
pub fn settings(url: &str, pipeline: &str) -> Settings {
    let mut s = Settings::default();
    s.pipeline = pipeline.to_owned();
    s.nats.url = url.to_owned();
    s.nats.connect_timeout = Duration::from_secs(5);
    s.stream.storage = StorageKind::File;
    s.validate().expect("test settings are valid");
    s
}

/// Retries `attempt` until it returns `Ok`, or panics with the last error after `deadline`.
pub async fn eventually<T, E, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) if start.elapsed() < deadline => {
                eprintln!("{what}: not yet ({err}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{what}: still failing after {deadline:?}: {err}"),
        }
    }
}
