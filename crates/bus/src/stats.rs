//! A worker's figures, shared between its lanes and its service endpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Counters and gauges of one worker copy.
#[derive(Debug, Default)]
pub struct WorkerStats {
    handled: AtomicU64,
    transient_failures: AtomicU64,
    dead_lettered: AtomicU64,
    in_flight: AtomicU64,
    gauges: Mutex<BTreeMap<String, i64>>,
}

/// A point-in-time copy of [`WorkerStats`].
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Messages handled successfully (acknowledged).
    pub handled: u64,
    /// Deliveries that failed transiently and were nak'ed for redelivery.
    pub transient_failures: u64,
    /// Messages sent to the dead-letter stream.
    pub dead_lettered: u64,
    /// Messages being handled right now.
    pub in_flight: u64,
    /// Gauges set by the worker and its components, e.g. `consumer_lag`,
    /// `outbox_backlog`.
    pub gauges: BTreeMap<String, i64>,
}

impl WorkerStats {
    pub(crate) fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn transient_failure(&self) {
        self.transient_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets a named gauge (e.g. the outbox backlog).
    pub fn set_gauge(&self, name: &str, value: i64) {
        if let Ok(mut g) = self.gauges.lock() {
            g.insert(name.to_owned(), value);
        }
    }

    /// A copy of every figure.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            handled: self.handled.load(Ordering::Relaxed),
            transient_failures: self.transient_failures.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            gauges: self.gauges.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }
}
