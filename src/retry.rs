//! The one retry policy of the crate, built on `backon` (the `backoff` crate
//! is unmaintained: RUSTSEC-2025-0012).
//!
//! Exponential backoff with full jitter between `min` and `max`; a server's
//! `Retry-After` replaces the computed delay (Graph asks clients to wait at
//! least that long after 429/503/504, so we never retry earlier).

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable};

/// How an error wants to be retried.
pub trait RetryHint {
    /// True if another attempt can succeed.
    fn is_retriable(&self) -> bool;
    /// A delay the server asked for (`Retry-After`), if any.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub min: Duration,
    pub max: Duration,
    /// Total attempts, including the first. `None`: retry until success or a
    /// permanent error.
    pub attempts: Option<u32>,
}

impl Policy {
    pub const fn new(min: Duration, max: Duration, attempts: Option<u32>) -> Self {
        Self { min, max, attempts }
    }

    fn builder(&self) -> ExponentialBuilder {
        let b = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter();
        match self.attempts {
            Some(n) => b.with_max_times(n.saturating_sub(1) as usize),
            None => b.without_max_times(),
        }
    }

    /// The `n`th delay (0-based) without jitter; for loops that are not a
    /// single future (the stream supervisor).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.min(30));
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// Runs `op` until it succeeds, fails permanently or the policy gives up.
/// `notify` sees every retried error and the delay before the next attempt.
pub async fn retry<T, E, F, Fut>(
    policy: Policy,
    op: F,
    mut notify: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    E: RetryHint,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    op.retry(policy.builder())
        .sleep(tokio::time::sleep)
        .when(|e: &E| e.is_retriable())
        .adjust(|e: &E, computed: Option<Duration>| {
            // `computed` is None once the attempts are used up: keep it so.
            computed.map(|d| e.retry_after().unwrap_or(d))
        })
        .notify(|e: &E, d| notify(e, d))
        .await
}

/// Parses a `Retry-After` header value: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    let when = humantime::parse_rfc3339_weak(value)
        .ok()
        .or_else(|| httpdate_to_system_time(value))?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP dates take.
fn httpdate_to_system_time(value: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])?
        + 1;
    let rfc3339 = format!(
        "{}-{:02}-{:02}T{}Z",
        parts[3],
        month,
        parts[1].parse::<u32>().ok()?,
        parts[4]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[derive(Debug)]
    struct E {
        retriable: bool,
        after: Option<Duration>,
    }
    impl RetryHint for E {
        fn is_retriable(&self) -> bool {
            self.retriable
        }
        fn retry_after(&self) -> Option<Duration> {
            self.after
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_exactly_never_earlier() {
        let calls = Arc::new(AtomicU32::new(0));
        let start = tokio::time::Instant::now();
        let c = calls.clone();
        let mut waits = vec![];
        let r: Result<u32, E> = retry(
            Policy::new(
                Duration::from_millis(10),
                Duration::from_millis(20),
                Some(5),
            ),
            || {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        Err(E {
                            retriable: true,
                            after: Some(Duration::from_secs(7)),
                        })
                    } else {
                        Ok(n)
                    }
                }
            },
            |_, d| waits.push(d),
        )
        .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(waits, vec![Duration::from_secs(7), Duration::from_secs(7)]);
        assert!(start.elapsed() >= Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried_and_attempts_are_bounded() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let r: Result<(), E> = retry(
            Policy::new(Duration::from_millis(1), Duration::from_millis(2), Some(3)),
            || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err(E {
                        retriable: false,
                        after: None,
                    })
                }
            },
            |_, _| {},
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let r: Result<(), E> = retry(
            Policy::new(Duration::from_millis(1), Duration::from_millis(2), Some(3)),
            || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err(E {
                        retriable: true,
                        after: Some(Duration::from_secs(1)),
                    })
                }
            },
            |_, _| {},
        )
        .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "Retry-After must not extend the attempt budget"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
