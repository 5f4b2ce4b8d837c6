//! The simulated payment provider: slow and fallible on demand, so sagas
//! can be tested against latency and declines.
//!
//! The provider is asked once per authorization that is not decided yet. Its
//! latency is waited out *before* the authorization's transaction begins
//! (a wrapper around the command handler), so a slow provider holds no database connection or lock
//! and, since the worker runs different orders in different lanes, delays
//! only its own order. Its verdict is a draw derived from the order id: the
//! same order always meets the same verdict (a retried authorization is not
//! a new chance), different orders are declined in the configured share.

use std::time::Duration;

use skein_bus::{Delivery, Handler, HandlerError};
use skein_contracts::payments::AuthorizePayment;
use skein_outbox::Store;
use uuid::Uuid;

use crate::store;

/// The simulated provider's behaviour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderConfig {
    /// Time the provider takes to decide an authorization (default 0).
    pub latency: Duration,
    /// Share of orders the provider declines with `provider_declined`,
    /// 0.0 to 1.0 (default 0.0).
    pub failure_rate: f64,
}

impl ProviderConfig {
    /// Why this configuration is not usable, if it is not.
    pub fn validate(&self) -> Result<(), String> {
        if (0.0..=1.0).contains(&self.failure_rate) {
            Ok(())
        } else {
            Err(format!(
                "the provider failure rate must be between 0.0 and 1.0, got {}",
                self.failure_rate
            ))
        }
    }

    /// Whether the provider declines `order`. A rate outside 0..1 counts as
    /// its nearest bound (NaN as 0).
    pub fn declines(&self, order: Uuid) -> bool {
        draw(order) < self.failure_rate
    }
}

/// A number in `[0, 1)` derived from every bit of `order` (splitmix64's
/// finaliser over both halves), evenly spread even for ids that differ
/// in a few bits only.
fn draw(order: Uuid) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let (high, low) = order.as_u64_pair();
    let bits = mix(high ^ mix(low.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    // The top 53 bits fill an f64's mantissa exactly.
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Waits out the provider's latency before an undecided authorization
/// reaches `inner` (the transactional command handler).
#[derive(Debug)]
pub(crate) struct Latency<H> {
    pub(crate) latency: Duration,
    pub(crate) store: Store,
    pub(crate) inner: H,
}

impl<H: Handler> Latency<H> {
    /// Whether the provider is asked about this delivery: a valid
    /// authorization whose order has no outcome yet. Invalid commands are
    /// dead-lettered and repeats answered from the record without asking.
    async fn asks_provider(&self, delivery: &Delivery) -> bool {
        if !delivery.envelope.is::<AuthorizePayment>() {
            return false;
        }
        let Ok(command) = delivery.envelope.decode::<AuthorizePayment>() else {
            return false;
        };
        if command.amount_cents <= 0 {
            return false;
        }
        let Ok(mut conn) = self.store.pool().acquire().await else {
            // The handler will meet the same trouble and ask for a retry.
            return true;
        };
        !matches!(
            store::payment(&mut conn, command.order_id).await,
            Ok(Some(_))
        )
    }
}

impl<H: Handler> Handler for Latency<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        if !self.latency.is_zero() && self.asks_provider(delivery).await {
            tokio::time::sleep(self.latency).await;
        }
        self.inner.handle(delivery).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(failure_rate: f64) -> ProviderConfig {
        ProviderConfig {
            latency: Duration::ZERO,
            failure_rate,
        }
    }

    #[test]
    fn the_provider_declines_about_the_configured_share_and_always_the_same_orders() {
        let orders: Vec<Uuid> = (0..4000).map(|_| Uuid::now_v7()).collect();
        let quarter = provider(0.25);
        let declined = orders.iter().filter(|o| quarter.declines(**o)).count();
        assert!((850..1150).contains(&declined), "{declined} of 4000 at 25%");
        assert!(orders
            .iter()
            .all(|o| quarter.declines(*o) == quarter.declines(*o)));
        assert!(orders.iter().all(|o| !provider(0.0).declines(*o)));
        assert!(orders.iter().all(|o| provider(1.0).declines(*o)));
        assert!(orders.iter().all(|o| !provider(f64::NAN).declines(*o)));
    }

    #[test]
    fn ids_that_differ_in_a_few_bits_are_spread_too() {
        let half = provider(0.5);
        let declined = (0..2000u128)
            .filter(|n| half.declines(Uuid::from_u128(*n)))
            .count();
        assert!((850..1150).contains(&declined), "{declined} of 2000 at 50%");
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        assert!(provider(0.0).validate().is_ok() && provider(1.0).validate().is_ok());
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(provider(bad).validate().is_err(), "{bad}");
        }
    }
}
