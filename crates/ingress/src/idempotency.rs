//! `Idempotency-Key`: the same key from the same caller gets the same answer.
//!
//! Responses are kept in memory, bounded (`idempotency_capacity`, oldest
//! dropped first) and for `idempotency_ttl`. One caller keeps at most a
//! hundredth of the capacity (at least 1): past that its own oldest answers
//! go first, so a caller keying request after request at its rate limit
//! does not push everyone else's answers out. A duplicate that arrives while the
//! first request is still running waits for its answer instead of running
//! again. A key reused with a different request (method, path or body) is
//! refused with 422. Answers that say "try again" (429, 5xx) are not kept.
//!
//! The ingress is stateless, so this memory is per copy and lost on restart.
//! What makes a retried order safe across copies and restarts is not this
//! cache: the order id is derived from (caller, key) (UUIDv5, see
//! [`derived_id`]), and so is the command's `ce-id` / `Nats-Msg-Id`. Two
//! ingress copies receiving the same request publish the same message:
//! JetStream drops the second within its duplicate window, and the orders
//! service, which treats a `place_order` for an existing order id as done,
//! absorbs it after that. Adding a product and restocking derive ids the
//! same way (the new product's, the restock's), which the catalog
//! recognises: a retry through another copy is not applied twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use tokio::sync::watch;
use uuid::Uuid;

use crate::problem::{ApiError, Problem};

/// Namespace of the UUIDv5 ids derived from idempotency keys. A contract:
/// changing it makes retries after a deploy place second orders.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_2d0e_5a8c_4f3b_9e7d_1c2a_3b4c_5d6e);

/// A deterministic id for `what` (e.g. `order`) from a caller's key.
pub fn derived_id(what: &str, scope: &str, key: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("{what}\n{scope}\n{key}").as_bytes())
}

/// Checks a client's `Idempotency-Key`: 1 to 255 visible ASCII characters.
pub(crate) fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ));
    }
    Ok(())
}

/// A response as kept for replays.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) problem: Option<Problem>,
}

#[derive(Debug)]
enum Slot {
    InFlight {
        fingerprint: [u8; 32],
        done: watch::Receiver<Option<Stored>>,
    },
    Done {
        fingerprint: [u8; 32],
        stored: Box<Stored>,
        at: Instant,
    },
}

/// What to do with a request carrying a key.
#[derive(Debug)]
pub(crate) enum Claim<'a> {
    /// First time: run it, then [`Guard::complete`].
    Run(Guard<'a>),
    /// Seen: answer this.
    Replay(Box<Stored>),
    /// Running elsewhere: wait on this, then claim again.
    Wait(watch::Receiver<Option<Stored>>),
}

/// The right to run a keyed request; dropping it unfinished frees the key.
#[derive(Debug)]
pub(crate) struct Guard<'a> {
    store: &'a IdempotencyStore,
    key: String,
    fingerprint: [u8; 32],
    tx: Option<watch::Sender<Option<Stored>>>,
}

impl Guard<'_> {
    /// Keeps `stored` for replays (unless it says "try again") and wakes
    /// the duplicates waiting for it.
    pub(crate) fn complete(mut self, stored: Stored) {
        let keep =
            !(stored.status.is_server_error() || stored.status == StatusCode::TOO_MANY_REQUESTS);
        let mut inner = self.store.lock();
        if keep {
            let at = Instant::now();
            inner.slots.insert(
                self.key.clone(),
                Slot::Done {
                    fingerprint: self.fingerprint,
                    stored: Box::new(stored.clone()),
                    at,
                },
            );
            inner.order.push_back((self.key.clone(), at));
            let share = self.store.per_caller;
            let scope = scope_of(&self.key).to_owned();
            let own = inner.by_caller.entry(scope.clone()).or_default();
            own.push_back((self.key.clone(), at));
            let mut over = Vec::new();
            while own.len() > share {
                over.extend(own.pop_front());
            }
            for (key, at) in over {
                inner.forget(&key, at);
            }
            // `order` keeps the entries of what a share dropped until they
            // come to its front: when they outnumber what is kept, they go.
            if inner.order.len() > 2 * inner.slots.len() + 1024 {
                let Inner { slots, order, .. } = &mut *inner;
                order.retain(|(key, at)| {
                    matches!(slots.get(key), Some(Slot::Done { at: done, .. }) if done == at)
                });
            }
        } else {
            inner.slots.remove(&self.key);
        }
        drop(inner);
        if let Some(tx) = self.tx.take() {
            // Waiters of an answer not kept run the request themselves.
            tx.send_replace(keep.then_some(stored));
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.store.lock().slots.remove(&self.key);
            tx.send_replace(None);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<String, Slot>,
    /// Completed answers, oldest first (some already forgotten).
    order: VecDeque<(String, Instant)>,
    /// Per caller (the key's scope), its completed answers, oldest first.
    by_caller: HashMap<String, VecDeque<(String, Instant)>>,
}

impl Inner {
    /// Drops the answer completed at `at` under `key`, if it is still the
    /// one kept (the key may have run again since).
    fn forget(&mut self, key: &str, at: Instant) {
        if matches!(self.slots.get(key), Some(Slot::Done { at: done, .. }) if *done == at) {
            self.slots.remove(key);
        }
    }
}

/// The caller a scoped key belongs to: what comes before its first newline
/// (`<scope>\n<key>`, as [`crate::routes`] makes them).
fn scope_of(key: &str) -> &str {
    key.split_once('\n').map_or("", |(scope, _)| scope)
}

/// Keys and their answers.
#[derive(Debug)]
pub(crate) struct IdempotencyStore {
    ttl: Duration,
    capacity: usize,
    /// Answers one caller keeps at most.
    per_caller: usize,
    inner: Mutex<Inner>,
}

impl IdempotencyStore {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            per_caller: (capacity / 100).max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` (already scoped to the caller) for a request with
    /// `fingerprint`.
    pub(crate) fn claim(&self, key: &str, fingerprint: [u8; 32]) -> Result<Claim<'_>, ApiError> {
        let now = Instant::now();
        let mut inner = self.lock();
        // Expire from the front: `order` lists completed answers oldest
        // first, and drops them while more than the capacity are kept
        // (entries of answers a caller's share dropped already go by).
        while let Some((k, at)) = inner.order.front().cloned() {
            if now.duration_since(at) < self.ttl && inner.slots.len() < self.capacity {
                break;
            }
            inner.order.pop_front();
            inner.forget(&k, at);
            // Its caller's oldest too (both lists are in completion order);
            // a caller with nothing left is forgotten.
            let scope = scope_of(&k).to_owned();
            if let Some(own) = inner.by_caller.get_mut(&scope) {
                if own
                    .front()
                    .is_some_and(|(key, when)| *key == k && *when == at)
                {
                    own.pop_front();
                }
                if own.is_empty() {
                    inner.by_caller.remove(&scope);
                }
            }
        }
        match inner.slots.get(key) {
            Some(Slot::Done {
                fingerprint: f,
                stored,
                at,
            }) if now.duration_since(*at) < self.ttl => {
                if *f != fingerprint {
                    return Err(ApiError::IdempotencyKeyReused);
                }
                return Ok(Claim::Replay(stored.clone()));
            }
            Some(Slot::InFlight {
                fingerprint: f,
                done,
            }) => {
                if *f != fingerprint {
                    return Err(ApiError::IdempotencyKeyReused);
                }
                return Ok(Claim::Wait(done.clone()));
            }
            _ => {}
        }
        let (tx, rx) = watch::channel(None);
        inner.slots.insert(
            key.to_owned(),
            Slot::InFlight {
                fingerprint,
                done: rx,
            },
        );
        Ok(Claim::Run(Guard {
            store: self,
            key: key.to_owned(),
            fingerprint,
            tx: Some(tx),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(status: StatusCode) -> Stored {
        Stored {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            problem: None,
        }
    }

    #[test]
    fn a_completed_key_replays_and_a_different_request_with_it_is_refused() {
        let s = IdempotencyStore::new(Duration::from_secs(60), 10);
        let Ok(Claim::Run(g)) = s.claim("u:k", [1; 32]) else {
            panic!("first claim must run");
        };
        assert!(matches!(s.claim("u:k", [1; 32]), Ok(Claim::Wait(_))));
        g.complete(stored(StatusCode::ACCEPTED));
        assert!(
            matches!(s.claim("u:k", [1; 32]), Ok(Claim::Replay(r)) if r.status == StatusCode::ACCEPTED)
        );
        assert!(matches!(
            s.claim("u:k", [2; 32]),
            Err(ApiError::IdempotencyKeyReused)
        ));
    }

    #[test]
    fn failures_to_retry_and_abandoned_runs_free_the_key() {
        let s = IdempotencyStore::new(Duration::from_secs(60), 10);
        if let Ok(Claim::Run(g)) = s.claim("k", [1; 32]) {
            g.complete(stored(StatusCode::SERVICE_UNAVAILABLE));
        }
        assert!(matches!(s.claim("k", [1; 32]), Ok(Claim::Run(_))));
        // the guard above was dropped unfinished
        assert!(matches!(s.claim("k", [1; 32]), Ok(Claim::Run(_))));
    }

    /// One caller keying request after request loses its own oldest
    /// answers, not the others'.
    #[test]
    fn a_caller_keeps_at_most_its_share_and_leaves_the_others_theirs() {
        let s = IdempotencyStore::new(Duration::from_secs(60), 300);
        let run = |key: &str| {
            if let Ok(Claim::Run(g)) = s.claim(key, [0; 32]) {
                g.complete(stored(StatusCode::OK));
            }
        };
        run("user:b\nmine");
        for n in 0..250 {
            run(&format!("user:a\nk{n}"));
        }
        // a's share is 3: its last three are kept, its older ones gone.
        for n in 247..250 {
            let kept = s.claim(&format!("user:a\nk{n}"), [0; 32]);
            assert!(matches!(kept, Ok(Claim::Replay(_))), "k{n}");
        }
        assert!(matches!(
            s.claim("user:a\nk246", [0; 32]),
            Ok(Claim::Run(_))
        ));
        assert!(matches!(
            s.claim("user:b\nmine", [0; 32]),
            Ok(Claim::Replay(_))
        ));
        // Nothing of a's forgotten answers is held on to.
        {
            let inner = s.lock();
            assert_eq!(inner.by_caller.get("user:a").map(VecDeque::len), Some(3));
            assert!(inner.slots.len() <= 5, "{} slots", inner.slots.len());
        }
        // However long a goes on, b's answer stays (the capacity counts
        // answers kept, not what a's share dropped), and what is listed
        // stays bounded.
        for n in 250..5000 {
            run(&format!("user:a\nk{n}"));
        }
        assert!(matches!(
            s.claim("user:b\nmine", [0; 32]),
            Ok(Claim::Replay(_))
        ));
        let inner = s.lock();
        assert!(
            inner.order.len() <= 2 * inner.slots.len() + 1025,
            "{}",
            inner.order.len()
        );
    }

    #[test]
    fn the_oldest_keys_go_when_full() {
        // Three callers, one answer each, room for two.
        let s = IdempotencyStore::new(Duration::from_secs(60), 2);
        for k in ["x\na", "y\nb", "z\nc"] {
            if let Ok(Claim::Run(g)) = s.claim(k, [0; 32]) {
                g.complete(stored(StatusCode::OK));
            }
        }
        assert!(matches!(s.claim("x\na", [0; 32]), Ok(Claim::Run(_))));
        assert!(matches!(s.claim("z\nc", [0; 32]), Ok(Claim::Replay(_))));
    }

    #[test]
    fn derived_ids_depend_on_caller_and_key() {
        assert_eq!(
            derived_id("order", "u1", "k"),
            derived_id("order", "u1", "k")
        );
        assert_ne!(
            derived_id("order", "u1", "k"),
            derived_id("order", "u2", "k")
        );
        assert_ne!(
            derived_id("order", "u1", "k"),
            derived_id("order", "u1", "k2")
        );
    }
}
