//! `Prefer: wait=N` (RFC 7240): hold a command's answer until the order is
//! final or N seconds pass.
//!
//! The waiter subscribes (core NATS) to the order's event subject
//! `events.orders.<id>.>` *before* the command is published, on the same
//! connection, so the outcome cannot slip past between publishing and
//! listening; nothing is polled.

use std::time::Duration;

use axum::http::HeaderMap;
use futures::StreamExt;
use uuid::Uuid;

use crate::problem::ApiError;
use crate::state::AppState;

/// The `wait` preference in seconds, capped at `max`; `None` when absent.
pub(crate) fn wait_preference(headers: &HeaderMap, max: Duration) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|p| {
            let (name, value) = p.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .next()
        .map(|secs| Duration::from_secs(secs).min(max))
}

/// A subscription to one order's events, made before its command is sent.
#[derive(Debug)]
pub(crate) struct OrderWatch {
    subscriber: async_nats::Subscriber,
}

impl OrderWatch {
    pub(crate) async fn start(state: &AppState, order_id: Uuid) -> Result<Self, ApiError> {
        let subject = skein_message::subject::event(
            skein_contracts::orders::SERVICE,
            &order_id.to_string(),
            ">",
        );
        let subscriber = state
            .bus
            .client()
            .subscribe(subject)
            .await
            .map_err(|_| ApiError::BusUnavailable)?;
        // No round trip needed: the command is published on this same
        // connection afterwards, and a server handles one connection's
        // operations in order, so it has the subscription before the command
        // (and long before any event the command causes).
        Ok(Self { subscriber })
    }

    /// Waits up to `wait` for an event named in `finals`; true when one came.
    pub(crate) async fn until(mut self, finals: &[&str], wait: Duration) -> bool {
        let found = tokio::time::timeout(wait, async {
            while let Some(message) = self.subscriber.next().await {
                let name = message.subject.rsplit('.').next().unwrap_or("");
                if finals.contains(&name) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        let _ = self.subscriber.unsubscribe().await;
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = v.parse() {
            h.insert("prefer", v);
        }
        h
    }

    #[test]
    fn the_wait_preference_is_read_and_capped() {
        let max = Duration::from_secs(30);
        assert_eq!(
            wait_preference(&headers("wait=5"), max),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            wait_preference(&headers("respond-async, wait=100"), max),
            Some(max)
        );
        assert_eq!(wait_preference(&headers("return=minimal"), max), None);
        assert_eq!(wait_preference(&headers("wait=soon"), max), None);
        assert_eq!(wait_preference(&HeaderMap::new(), max), None);
    }
}
