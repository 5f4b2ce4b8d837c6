//! Applying events to the read models.
//!
//! [`apply`] is the only place an event changes a read model: the live
//! handler ([`Projection`]) and [`rebuild`](crate::rebuild::rebuild) both go
//! through it, so a rebuild cannot disagree with the incremental path.

use skein_bus::{Delivery, HandlerError};
use skein_contracts::identity::UserRegistered;
use skein_contracts::orders::{
    OrderCancellationRequested, OrderCancelled, OrderConfirmed, OrderPlaced, OrderRejected,
    OrderStatus,
};
use skein_message::envelope::format_time;
use skein_message::Envelope;
use skein_outbox::{Backend, Statements, Store, Tx, TxHandler};
use sqlx::AnyConnection;
use uuid::Uuid;

use crate::store::{self, OrderChange, TimelineEntry, UserRow};
use crate::ReadModel;

/// The live handler of `events.identity.>` and `events.orders.>`, run once
/// per message through the inbox.
#[derive(Debug)]
pub struct Projection {
    backend: Backend,
}

impl Projection {
    /// The handler for a store on `backend`.
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }
}

impl TxHandler for Projection {
    async fn handle(&self, tx: &mut Tx, delivery: &Delivery) -> Result<(), HandlerError> {
        // Wait for a running rebuild to commit, so its clear-and-replay never
        // overlaps this event's writes (see `store::lock_for_event`).
        store::lock_for_event(tx, self.backend).await.map_err(db)?;
        apply(
            tx,
            &delivery.envelope,
            delivery.info.stream_sequence,
            ReadModel::All,
        )
        .await?;
        Ok(())
    }
}

/// Applies `envelope`, stored at `sequence` in `EVENTS`, to `model` again,
/// whether or not the projector's inbox has it, in a transaction of its own
/// (`skein replay --into projector --force-reprocess <model>`).
///
/// Safe beside the live consumer and a rebuild: like the live handler it
/// waits for a running rebuild to commit (the rebuild lock), and a
/// projection is re-appliable, so a row that is missing or behind its
/// events is repaired and a correct one stays as it is. A row *ahead* of
/// its events (a status of higher rank than any event says) is not moved
/// back: rebuild the model for that. The inbox is left alone. An event
/// outside `model`'s subjects is [`Applied::Ignored`].
pub async fn reapply(
    store: &Store,
    envelope: &Envelope,
    sequence: u64,
    model: ReadModel,
) -> Result<Applied, HandlerError> {
    if !model
        .filters()
        .iter()
        .any(|f| skein_message::subject::matches(f, &envelope.nats_subject))
    {
        return Ok(Applied::Ignored);
    }
    let mut tx = store.begin().await.map_err(HandlerError::transient)?;
    store::lock_for_event(&mut tx, store.backend())
        .await
        .map_err(db)?;
    let applied = apply(&mut tx, envelope, sequence, model).await?;
    tx.commit().await.map_err(HandlerError::transient)?;
    Ok(applied)
}

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::transient(format!("database: {e}"))
}

/// Whether an event can change a read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event is about users or orders and was applied (again, perhaps:
    /// applying twice changes nothing).
    Projected,
    /// No read model cares about this event.
    Ignored,
}

/// The order of statuses: a status only replaces one of lower rank (or of
/// the same rank from an earlier stream sequence).
pub fn status_rank(status: OrderStatus) -> i64 {
    match status {
        OrderStatus::Pending => 0,
        OrderStatus::Confirmed | OrderStatus::Rejected => 1,
        OrderStatus::Cancelled => 2,
    }
}

/// Applies one event, stored at `sequence` in `EVENTS`, to the parts of
/// `model` it concerns.
///
/// Idempotent and order-independent per row: users and timeline entries are
/// upserts keyed by user id and event id, an order's status is a max-register
/// over (rank, sequence). An event that cannot be decoded is a permanent
/// error (the live consumer dead-letters it, a rebuild skips it); a database
/// failure is transient.
pub async fn apply(
    conn: &mut AnyConnection,
    envelope: &Envelope,
    sequence: u64,
    model: ReadModel,
) -> Result<Applied, HandlerError> {
    let seq = i64::try_from(sequence)
        .map_err(|_| HandlerError::permanent(format!("stream sequence {sequence} too large")))?;
    let at = micros(envelope);
    if envelope.is::<UserRegistered>() {
        let u: UserRegistered = envelope.decode()?;
        if model.includes(ReadModel::Users) {
            let user = UserRow {
                id: u.user_id.to_string(),
                email: u.email,
                name: u.name,
                role: store::role_name(u.role).to_owned(),
                created_at: format_time(envelope.time),
            };
            store::upsert_user(conn, &user).await.map_err(db)?;
        }
        return Ok(Applied::Projected);
    }

    // Orders events: (order, customer, total if carried, status if any).
    let (order_id, change) = if envelope.is::<OrderPlaced>() {
        let e: OrderPlaced = envelope.decode()?;
        let change = (e.customer_id, Some(e.total_cents), OrderStatus::Pending);
        (e.order_id, Some(change))
    } else if envelope.is::<OrderConfirmed>() {
        let e: OrderConfirmed = envelope.decode()?;
        let change = (e.customer_id, Some(e.total_cents), OrderStatus::Confirmed);
        (e.order_id, Some(change))
    } else if envelope.is::<OrderRejected>() {
        // An order refused at placement (unknown product) has no
        // order_placed: it still counts, with a total of 0.
        let e: OrderRejected = envelope.decode()?;
        (
            e.order_id,
            Some((e.customer_id, None, OrderStatus::Rejected)),
        )
    } else if envelope.is::<OrderCancelled>() {
        let e: OrderCancelled = envelope.decode()?;
        (
            e.order_id,
            Some((e.customer_id, None, OrderStatus::Cancelled)),
        )
    } else if envelope.is::<OrderCancellationRequested>() {
        // The status stays until the saga has given everything back and
        // order_cancelled follows; only the timeline shows the request.
        let e: OrderCancellationRequested = envelope.decode()?;
        (e.order_id, None)
    } else if is_orders_event(envelope) {
        // An orders event this version does not know: still part of the
        // order's history.
        let Some(order_id) = envelope.entity().and_then(|e| Uuid::parse_str(e).ok()) else {
            return Ok(Applied::Ignored);
        };
        (order_id, None)
    } else {
        return Ok(Applied::Ignored);
    };

    // The order and its timeline entry: one trip to the database where the
    // backend allows it.
    let mut writes = Statements::for_connection(conn);
    if let (Some((customer_id, total_cents, status)), true) =
        (change, model.includes(ReadModel::Orders))
    {
        store::push_upsert_order(
            &mut writes,
            &OrderChange {
                order_id,
                customer_id,
                total_cents,
                status,
                status_seq: seq,
                at,
            },
        );
    }
    if model.includes(ReadModel::Timeline) {
        store::push_timeline_entry(
            &mut writes,
            &TimelineEntry {
                event_id: envelope.id,
                order_id,
                stream_seq: seq,
                kind: envelope.kind.clone(),
                event_time: format_time(envelope.time),
                event_at: at,
            },
        );
    }
    writes.run(conn).await.map_err(db)?;
    Ok(Applied::Projected)
}

fn is_orders_event(envelope: &Envelope) -> bool {
    envelope
        .type_name()
        .map(|t| t.service == skein_contracts::orders::SERVICE)
        .unwrap_or(false)
        && envelope.nats_subject.starts_with("events.orders.")
}

/// The event's `ce-time` in unix microseconds, the time column type of every
/// skein table.
fn micros(envelope: &Envelope) -> i64 {
    i64::try_from(envelope.time.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}
