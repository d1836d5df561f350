//! What a running pipeline tells `hone serve`'s status and `/metrics`
//! endpoints: rounds completed, the stage being called, each stage's time,
//! and the latest value of every metric. Written by the workers, read by
//! the server's threads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A run's live figures.
#[derive(Default)]
pub struct Telemetry {
    /// Rounds completed and journalled (a continued run counts its earlier ones).
    completed: AtomicU64,
    /// Set once the last round is journalled or the run failed.
    finished: AtomicBool,
    /// `hone serve` was asked to stop after this many rounds complete.
    stop: AtomicBool,
    stop_after: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The stage in a call now, with its round.
    current: Option<(String, u64)>,
    /// Seconds spent in each stage's calls, over all workers.
    seconds: BTreeMap<String, f64>,
    /// The latest value of each (stage, metric).
    latest: BTreeMap<(String, String), f64>,
}

/// A copy of the figures, for one response.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Rounds completed.
    pub completed: u64,
    /// Whether the run has ended.
    pub finished: bool,
    /// The stage in a call now, and its round.
    pub current: Option<(String, u64)>,
    /// Seconds per stage.
    pub seconds: BTreeMap<String, f64>,
    /// Latest metric values.
    pub latest: BTreeMap<(String, String), f64>,
}

impl Telemetry {
    /// Rounds completed so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Records that `n` rounds are complete.
    pub fn set_completed(&self, n: u64) {
        self.completed.fetch_max(n, Ordering::SeqCst);
    }

    /// `hone serve` asks the run to stop once `completed` rounds plus the
    /// one the clocks may be about to let finish are complete: round
    /// `completed` (0-based) still completes, no later one does. Naming
    /// the round, not just raising a flag, matters: a signal that lands
    /// after a round completed but before every worker's clock let the next
    /// one finish would otherwise leave that round unfinishable and the
    /// server waiting for it forever.
    pub fn request_stop(&self, completed: u64) {
        self.stop_after.store(completed + 1, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a worker's clock may let the rounds before `allowed` finish.
    pub fn allows(&self, allowed: u64) -> bool {
        !self.stop.load(Ordering::SeqCst) || allowed <= self.stop_after.load(Ordering::SeqCst)
    }

    /// Records that the run ended.
    pub fn set_finished(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    /// A stage call begins.
    pub fn enter(&self, stage: &str, round: u64) {
        if let Ok(mut i) = self.inner.lock() {
            i.current = Some((stage.to_string(), round));
        }
    }

    /// A stage call that began with [`Telemetry::enter`] took `took`.
    pub fn leave(&self, stage: &str, took: Duration) {
        if let Ok(mut i) = self.inner.lock() {
            *i.seconds.entry(stage.to_string()).or_default() += took.as_secs_f64();
            if i.current.as_ref().is_some_and(|(s, _)| s == stage) {
                i.current = None;
            }
        }
    }

    /// A stage reported a metric.
    pub fn metric(&self, stage: &str, name: &str, value: f64) {
        if let Ok(mut i) = self.inner.lock() {
            i.latest
                .insert((stage.to_string(), name.to_string()), value);
        }
    }

    /// A copy of everything.
    pub fn figures(&self) -> Figures {
        let i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Figures {
            completed: self.completed(),
            finished: self.finished.load(Ordering::SeqCst),
            current: i.current.clone(),
            seconds: i.seconds.clone(),
            latest: i.latest.clone(),
        }
    }
}
