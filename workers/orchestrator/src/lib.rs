//! The orchestrator: the saga coordinator of the order platform.
//!
//! # Sagas
//!
//! **place_order**, started by `orders.order_placed` (one instance per
//! order):
//!
//! | step | sends | completes on | fails on | compensation |
//! |---|---|---|---|---|
//! | reserve_stock | `catalog.reserve_stock` | `stock_reserved` | `stock_rejected` | `catalog.release_stock` |
//! | authorize_payment (pivot) | `payments.authorize_payment` | `payment_authorized` | `payment_declined` | `payments.refund_payment` |
//! | confirm_order | `orders.confirm_order` | `order_confirmed` | | |
//!
//! After compensating a failure it sends `orders.reject_order` with the
//! reason. `orders.order_cancellation_requested` cancels it before its
//! pivot completes: it compensates what it did, the step in flight
//! included, and sends `orders.mark_cancelled`. Either final command is
//! awaited like a forward step (`order_rejected`, `order_cancelled`; sent
//! again on the forward deadline, failed after the forward attempts): the
//! instance is `compensated` once orders has ended the order. A cancel that comes after
//! the pivot lets it confirm the order; orders then requests the
//! cancellation again as a confirmed order's, which starts cancel_order.
//!
//! **cancel_order**, started by `orders.order_cancellation_requested` of a
//! confirmed order: `payments.refund_payment` (pivot; `payment_refunded`),
//! `catalog.release_stock` (`stock_released`), `orders.mark_cancelled`
//! (`order_cancelled`), each sent again on its deadline until its attempts
//! run out.
//!
//! # Queries (admin only)
//!
//! `get_saga` (one instance with its transitions), `list_sagas` (by status
//! or key, newest first, with a cursor), `stuck_sagas` (live instances
//! past their deadline, and failed ones, with what they wait for), and
//! `retry_saga`, which sends a failed instance's unanswered command again
//! (`skein saga retry`).

pub mod sagas;

use std::sync::Arc;
use std::time::Duration;

use skein_bus::provision::EVENTS;
use skein_bus::Bus;
use skein_contracts::orchestrator::{
    GetSaga, ListSagas, RetrySaga, SagaPage, StuckList, StuckSagas,
};
use skein_contracts::{Caller, Role, ServiceError, Validate};
use skein_outbox::Store;
use skein_saga::{Coordinator, RetryError};
use skein_service::{Consumers, Host, HostConfig};
use uuid::Uuid;

/// The worker's name: its consumer on `EVENTS`, inbox, service name and
/// `ce-source`. A contract: renaming it makes it consume `EVENTS` again
/// from the start.
pub const NAME: &str = skein_contracts::orchestrator::SERVICE;

/// Deadlines and retries of the sagas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorConfig {
    /// How long catalog may take to reserve stock (default 30 s: longer
    /// than a command held by a copy that died takes to come back, the
    /// consumers' 10 s ack_wait plus a retry, since the step is sent once).
    pub reserve_deadline: Duration,
    /// How long payments may take to authorize (default 30 s, for the same
    /// reason): past it the order is rejected and a late authorization
    /// refunded.
    pub payment_deadline: Duration,
    /// How long each send of a command that only goes forward (confirm,
    /// cancel-order's steps) may take before it is sent again (default 5 s).
    pub forward_deadline: Duration,
    /// Sends of such a command before the instance fails (default 10: 50 s
    /// with the default deadline, enough to ride out a broker restart).
    pub forward_attempts: u32,
    /// How often passed deadlines are looked for (default 200 ms).
    pub tick: Duration,
    /// How long an instance that ended (completed or compensated) is kept,
    /// with its transitions, for `skein saga show` and traces (default 30
    /// days, [`skein_saga::coordinator::DEFAULT_RETENTION`]). Failed
    /// instances are kept until an operator deals with them.
    pub retention: Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            reserve_deadline: Duration::from_secs(30),
            payment_deadline: Duration::from_secs(30),
            forward_deadline: Duration::from_secs(5),
            forward_attempts: 10,
            tick: Duration::from_millis(200),
            retention: skein_saga::coordinator::DEFAULT_RETENTION,
        }
    }
}

/// Why the orchestrator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A saga definition is broken.
    #[error(transparent)]
    Definition(#[from] skein_saga::DefinitionError),
    /// The host (bus, store, migrations) failed.
    #[error(transparent)]
    Host(#[from] skein_service::Error),
    /// The saga tables could not be created (or, on a store that may not
    /// migrate, are not this build's).
    #[error("the saga tables are not usable")]
    Migrate(#[source] skein_outbox::Error),
}

/// Migrates the store and runs the platform's sagas on `bus`.
pub async fn start(
    bus: Bus,
    store: Store,
    host: HostConfig,
    config: OrchestratorConfig,
) -> Result<Host, StartError> {
    start_with(bus, store, host, platform_sagas(&config)?, &config, |_| {}).await
}

/// The platform's sagas (place_order, cancel_order) with `config`'s deadlines.
pub fn platform_sagas(
    config: &OrchestratorConfig,
) -> Result<Vec<skein_saga::Saga>, skein_saga::DefinitionError> {
    Ok(vec![
        sagas::place_order(config)?,
        sagas::cancel_order(config)?,
    ])
}

/// Runs `sagas` (checked definitions) with deadlines looked at every
/// `config.tick` and ended instances kept for `config.retention` (its
/// deadlines are the sagas'); `tune` adjusts the consumer.
pub async fn start_with(
    bus: Bus,
    store: Store,
    host: HostConfig,
    sagas: Vec<skein_saga::Saga>,
    config: &OrchestratorConfig,
    tune: impl FnOnce(&mut skein_bus::WorkerConfig),
) -> Result<Host, StartError> {
    store
        .migrate("saga", skein_saga::MIGRATIONS)
        .await
        .map_err(StartError::Migrate)?;
    // Deadlines wait for replies that came in time but wait in the
    // consumer's backlog (this worker was down, or is behind).
    let coordinator = Coordinator::new(sagas, store.clone(), host.name.clone())?
        .deadlines_wait_for(bus.clone(), EVENTS, &host.name)
        .retain_ended_for(config.retention);
    if config.retention < host.relay.inbox_retention {
        tracing::warn!(
            retention = ?config.retention,
            inbox_retention = ?host.relay.inbox_retention,
            "sagas that ended are kept for less time than the inbox keeps its records: \
             a start event replayed after both forgot it starts its saga again"
        );
    }
    let mut host = Host::start(bus, store, host).await?;
    register_queries(&mut host, Arc::new(coordinator.clone())).await?;
    let watcher = coordinator.clone();
    bind_consumers(&mut host, coordinator, tune).await?;
    let tick = config.tick;
    host.spawn_task(move |shutdown| watcher.spawn_upkeep(tick, shutdown));
    Ok(host)
}

/// The coordinator of the platform's sagas (with `config`'s deadlines) for
/// the worker `name`, keeping its instances in `store`; migrates the saga
/// tables.
pub async fn coordinator(
    store: &Store,
    name: &str,
    config: &OrchestratorConfig,
) -> Result<Coordinator, StartError> {
    store
        .migrate("saga", skein_saga::MIGRATIONS)
        .await
        .map_err(StartError::Migrate)?;
    Ok(Coordinator::new(
        platform_sagas(config)?,
        store.clone(),
        name,
    )?)
}

/// Binds `coordinator` to the events its sagas react to, from `EVENTS`.
/// The live worker ([`start_with`]) and `skein replay --into orchestrator`
/// (with [`coordinator`]) both bind it here. Deadlines are not consumed
/// messages: the live worker watches them.
pub async fn bind_consumers<C: Consumers>(
    consumers: &mut C,
    coordinator: Coordinator,
    tune: impl FnOnce(&mut skein_bus::WorkerConfig),
) -> skein_service::Result<()> {
    let filters = coordinator.filter_subjects();
    consumers.consume(EVENTS, filters, coordinator, tune).await
}

fn admin_only(caller: &Caller) -> Result<(), ServiceError> {
    if caller.role == Role::Admin {
        Ok(())
    } else {
        Err(ServiceError::forbidden("sagas are for admins"))
    }
}

fn internal(e: sqlx::Error) -> ServiceError {
    tracing::error!(error = %e, "orchestrator query failed");
    ServiceError::internal()
}

async fn register_queries(
    host: &mut Host,
    coordinator: Arc<Coordinator>,
) -> skein_service::Result<()> {
    let c = coordinator.clone();
    host.query(move |q: GetSaga, _| {
        let c = c.clone();
        async move {
            admin_only(&q.caller)?;
            c.get(q.saga_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| ServiceError::not_found(format!("no saga instance {}", q.saga_id)))
        }
    })
    .await?;
    let c = coordinator.clone();
    host.query(move |q: ListSagas, _| {
        let c = c.clone();
        async move {
            admin_only(&q.caller)?;
            q.validate().map_err(|v| ServiceError::invalid(&v))?;
            let cursor = match &q.cursor {
                Some(text) => Some(Uuid::parse_str(text).map_err(|_| {
                    ServiceError::invalid(&[skein_contracts::Violation {
                        field: "/cursor".into(),
                        message: "not a cursor from a previous page".into(),
                    }])
                })?),
                None => None,
            };
            let (items, next) = c
                .list(q.status, q.key.as_deref(), cursor, q.limit)
                .await
                .map_err(internal)?;
            Ok(SagaPage {
                items,
                next_cursor: next.map(|n| n.to_string()),
            })
        }
    })
    .await?;
    let c = coordinator.clone();
    host.query(move |q: RetrySaga, _| {
        let c = c.clone();
        async move {
            admin_only(&q.caller)?;
            // `skein saga retry` asks as the operator (no user id).
            let by = if q.caller.user_id.is_nil() {
                "the operator".to_owned()
            } else {
                format!("admin {}", q.caller.user_id)
            };
            c.retry(q.saga_id, &by).await.map_err(|e| match e {
                RetryError::NotFound(_) => ServiceError::not_found(e.to_string()),
                RetryError::Refused(_) => ServiceError::conflict(e.to_string()),
                e => {
                    tracing::error!(error = %e, "saga retry failed");
                    ServiceError::internal()
                }
            })
        }
    })
    .await?;
    let c = coordinator;
    host.query(move |q: StuckSagas, _| {
        let c = c.clone();
        async move {
            admin_only(&q.caller)?;
            let overdue = Duration::from_millis(q.min_overdue_ms.unwrap_or(5000));
            let (items, more) = c.stuck(overdue, 500).await.map_err(internal)?;
            Ok(StuckList { items, more })
        }
    })
    .await?;
    Ok(())
}
