//! How far the coordinator's consumer has got: deadlines wait for it.
//!
//! A step's deadline is about when its reply was *sent*, not about when the
//! coordinator got round to it. When the coordinator was down (a deploy, a
//! crash) or falls behind, replies that came in time wait in its consumer's
//! backlog; judging deadlines by the clock alone would compensate steps
//! that succeeded in time, and ignore their replies as late. So a deadline
//! is applied only once the consumer has acknowledged every message stored
//! in the stream before it.
//!
//! The server says how far a consumer has acknowledged as a stream
//! sequence (its acknowledgement floor), not a time, so [`Backlog`] keeps
//! samples of the stream's last sequence with the time each was taken:
//! once the floor reaches a sample's sequence, everything stored before
//! that sample's time has been acknowledged. It needs only the stream's
//! and the consumer's info, which a service's own NATS user may read.
//!
//! What this costs: a message that fails again and again (until it is
//! dead-lettered), or a handler that hangs, holds the floor, and with it the
//! deadlines of everything after it. So the wait is bounded: a deadline
//! more than [`MAX_HOLD`] past is applied whatever the consumer's state,
//! and while NATS cannot say how far the consumer has got, the last answer
//! it gave stands (within the same bound).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use skein_bus::Bus;

/// Most samples kept while the consumer is behind (one per deadline round):
/// past it no new ones are taken, and the oldest, which are the first to
/// be reached, stay.
const MAX_SAMPLES: usize = 10_000;

/// The longest a deadline waits for the consumer: far longer than a
/// deploy's restart, short enough that a stuck message does not hold every
/// saga for good.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(600);

/// A consumer whose acknowledgements deadlines wait for.
#[derive(Debug)]
pub(crate) struct Backlog {
    bus: Bus,
    stream: String,
    consumer: String,
    /// (when, the stream's last sequence then), oldest first.
    samples: Mutex<VecDeque<(i64, u64)>>,
    /// The latest time [`Backlog::consumed_before`] answered.
    known: AtomicI64,
}

impl Backlog {
    pub(crate) fn new(bus: Bus, stream: &str, consumer: &str) -> Self {
        Self {
            bus,
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            samples: Mutex::new(VecDeque::new()),
            known: AtomicI64::new(i64::MIN),
        }
    }

    /// The time (µs since the epoch) up to which deadlines may be applied
    /// at `now`: what [`Backlog::consumed_before`] says (or said last, when
    /// NATS cannot answer now), but never earlier than [`MAX_HOLD`] ago.
    pub(crate) async fn cutoff(&self, now: i64) -> i64 {
        match self.consumed_before(now).await {
            Ok(before) => {
                self.known.fetch_max(before, Ordering::AcqRel);
            }
            Err(e) => tracing::debug!(error = %e, "cannot tell how far the consumer has got"),
        }
        let known = self.known.load(Ordering::Acquire);
        let bound = now.saturating_sub(i64::try_from(MAX_HOLD.as_micros()).unwrap_or(i64::MAX));
        known.max(bound).min(now)
    }

    /// A time (µs since the epoch, at most `now`) before which every message
    /// stored in the stream has been acknowledged by the consumer: deadlines
    /// up to it may be applied. `i64::MIN` while nothing can be said yet.
    async fn consumed_before(&self, now: i64) -> Result<i64, String> {
        let js = self.bus.jetstream();
        let stream = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| format!("cannot read stream {}: {e}", self.stream))?;
        // Every message stored before `now` has a sequence up to this one.
        let last = stream.cached_info().state.last_sequence;
        let info = stream
            .consumer_info(&self.consumer)
            .await
            .map_err(|e| format!("cannot read consumer {}: {e}", self.consumer))?;
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            // Nothing left to deliver or to acknowledge.
            samples.clear();
            return Ok(now);
        }
        if samples.len() < MAX_SAMPLES {
            samples.push_back((now, last));
        }
        let floor = info.ack_floor.stream_sequence;
        let mut reached = i64::MIN;
        while let Some(&(at, sequence)) = samples.front() {
            if sequence > floor {
                break;
            }
            reached = at;
            samples.pop_front();
        }
        if reached > i64::MIN {
            // Kept: the floor does not go back, so it stays reached.
            samples.push_front((reached, 0));
        }
        Ok(reached)
    }
}
