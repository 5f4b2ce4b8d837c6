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
    /// Gauges of each consumer (name, then stream): a worker may consume
    /// from several streams (orders takes events and commands).
    consumers: Mutex<BTreeMap<String, BTreeMap<String, i64>>>,
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
    /// Gauges set by the worker and its components, e.g. `outbox_backlog`;
    /// each consumer's (`consumer_lag`, `ack_pending`, `dlq_depth`) summed
    /// over the streams the worker consumes, and by stream as
    /// `consumer_lag.EVENTS`, `consumer_lag.COMMANDS`.
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

    /// Sets a gauge of the consumer on `stream` (e.g. its lag): the
    /// snapshot has it by stream and summed over the worker's consumers.
    pub fn set_consumer_gauge(&self, name: &str, stream: &str, value: i64) {
        if let Ok(mut c) = self.consumers.lock() {
            c.entry(name.to_owned())
                .or_default()
                .insert(stream.to_owned(), value);
        }
    }

    /// A copy of every figure.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut gauges = self.gauges.lock().map(|g| g.clone()).unwrap_or_default();
        if let Ok(consumers) = self.consumers.lock() {
            for (name, streams) in consumers.iter() {
                let sum = streams.values().fold(0_i64, |a, v| a.saturating_add(*v));
                gauges.insert(name.clone(), sum);
                for (stream, value) in streams {
                    gauges.insert(format!("{name}.{stream}"), *value);
                }
            }
        }
        StatsSnapshot {
            handled: self.handled.load(Ordering::Relaxed),
            transient_failures: self.transient_failures.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            gauges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_gauges_add_up_over_streams_and_keep_each() {
        let stats = WorkerStats::default();
        stats.set_consumer_gauge("consumer_lag", "COMMANDS", 50_000);
        stats.set_consumer_gauge("consumer_lag", "EVENTS", 0);
        stats.set_consumer_gauge("consumer_lag", "EVENTS", 3);
        stats.set_gauge("outbox_backlog", 7);
        let gauges = stats.snapshot().gauges;
        assert_eq!(gauges.get("consumer_lag"), Some(&50_003));
        assert_eq!(gauges.get("consumer_lag.COMMANDS"), Some(&50_000));
        assert_eq!(gauges.get("consumer_lag.EVENTS"), Some(&3));
        assert_eq!(gauges.get("outbox_backlog"), Some(&7));
    }
}
