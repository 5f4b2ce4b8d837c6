//! [`AppState`]: what every handler shares, and the two ways it reaches a
//! service: [`AppState::ask`] (a query, behind the service's timeout and
//! circuit breaker) and [`AppState::publish`] (a command, stored by JetStream).

use std::sync::Arc;

use async_nats::connection::State as ConnectionState;
use skein_bus::{Bus, Publisher};
use skein_message::{Envelope, MessageContext, Query};
use skein_service::RequestError;

use crate::auth::Keys;
use crate::breaker::Breakers;
use crate::config::IngressConfig;
use crate::idempotency::IdempotencyStore;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::problem::ApiError;

/// Shared by every request.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) config: IngressConfig,
    pub(crate) bus: Bus,
    pub(crate) publisher: Publisher,
    pub(crate) keys: Keys,
    pub(crate) breakers: Breakers,
    pub(crate) limiter: RateLimiter,
    pub(crate) login_limiter: RateLimiter,
    /// Per address, for tokens not verified before (a signature check
    /// each): `rate_limit`'s settings, a bucket of its own, so anonymous
    /// requests from a shared address do not lock its users out.
    pub(crate) unchecked_limiter: RateLimiter,
    pub(crate) idempotency: IdempotencyStore,
    pub(crate) metrics: Metrics,
    /// One trace at a time: each reads streams through.
    pub(crate) traces: tokio::sync::Semaphore,
    /// `/health`'s last answer, reused for a second.
    pub(crate) health: tokio::sync::Mutex<crate::health::LastHealth>,
}

/// The state as handlers get it.
pub(crate) type Shared = Arc<AppState>;

impl AppState {
    pub(crate) fn new(config: IngressConfig, bus: Bus) -> Self {
        Self {
            publisher: bus.publisher(),
            keys: Keys::default(),
            breakers: Breakers::new(config.breaker),
            limiter: RateLimiter::new(config.rate_limit, config.rate_limit_clients),
            login_limiter: RateLimiter::new(config.login_rate_limit, config.rate_limit_clients),
            unchecked_limiter: RateLimiter::new(config.rate_limit, config.rate_limit_clients),
            idempotency: IdempotencyStore::new(config.idempotency_ttl, config.idempotency_capacity),
            metrics: Metrics::default(),
            traces: tokio::sync::Semaphore::new(1),
            health: tokio::sync::Mutex::new(None),
            bus,
            config,
        }
    }

    /// Whether the NATS connection is up right now.
    pub(crate) fn bus_connected(&self) -> bool {
        self.bus.client().connection_state() == ConnectionState::Connected
    }

    /// Asks `query`'s service, behind its breaker and timeout.
    ///
    /// Error answers below 500 are the service's verdict and keep their
    /// status; a service that does not answer counts against its breaker.
    pub(crate) async fn ask<Q: Query>(
        &self,
        query: &Q,
        context: &MessageContext,
    ) -> Result<Q::Reply, ApiError> {
        if !self.bus_connected() {
            return Err(ApiError::BusUnavailable);
        }
        let service = Q::SERVICE;
        let permit =
            self.breakers
                .acquire(service)
                .map_err(|retry_after| ApiError::ServiceUnavailable {
                    service: service.to_owned(),
                    retry_after,
                })?;
        let timeout = self.config.timeout_of(service);
        let result = skein_service::request_in(&self.bus, query, Some(context), timeout).await;
        match result {
            Ok(reply) => {
                permit.success();
                Ok(reply)
            }
            Err(RequestError::Service(e)) if e.status < 500 => {
                permit.success();
                Err(match e.status {
                    400 => ApiError::Invalid(vec![skein_contracts::Violation {
                        field: String::new(),
                        message: e.message,
                    }]),
                    401 => ApiError::Unauthenticated {
                        error: Some("invalid_token"),
                        detail: e.message,
                    },
                    403 => ApiError::Forbidden(e.message),
                    404 => ApiError::NotFound(e.message),
                    409 => ApiError::Conflict(e.message),
                    other => {
                        tracing::warn!(service, status = other, "unexpected error status");
                        ApiError::BadGateway(service.to_owned())
                    }
                })
            }
            Err(e) if !matches!(e, RequestError::Service(_)) && !self.bus_connected() => {
                // The bus went away under the request: no fault of the
                // service's, and its breaker must not be open when the bus
                // is back (the permit goes unreported).
                drop(permit);
                tracing::warn!(service, error = %e, "query failed: the message bus is unreachable");
                Err(ApiError::BusUnavailable)
            }
            Err(e) => {
                permit.failure();
                tracing::warn!(service, error = %e, "query failed");
                Err(match e {
                    RequestError::Timeout(..) => ApiError::Timeout(service.to_owned()),
                    RequestError::NoResponders(_) => ApiError::ServiceUnavailable {
                        service: service.to_owned(),
                        retry_after: std::time::Duration::from_secs(1),
                    },
                    _ => ApiError::BadGateway(service.to_owned()),
                })
            }
        }
    }

    /// Publishes a command and waits until JetStream has stored it; `true`
    /// when JetStream already had its id (within its duplicate window: a
    /// keyed request repeated) and stored nothing.
    pub(crate) async fn publish(&self, envelope: &Envelope) -> Result<bool, ApiError> {
        if !self.bus_connected() {
            return Err(ApiError::BusUnavailable);
        }
        let stored = tokio::time::timeout(
            self.config.publish_timeout,
            self.publisher.publish(envelope),
        )
        .await;
        match stored {
            Ok(Ok(ack)) => {
                self.metrics
                    .command_published(&envelope.kind, ack.duplicate);
                Ok(ack.duplicate)
            }
            // Sent, perhaps stored: the client must not read "nothing was
            // accepted" and retry without its key.
            Ok(Err(e)) => {
                tracing::error!(kind = %envelope.kind, error = %e, "cannot publish a command");
                Err(ApiError::Unconfirmed)
            }
            Err(_) => {
                tracing::error!(kind = %envelope.kind, "publishing a command timed out");
                Err(ApiError::Unconfirmed)
            }
        }
    }
}
