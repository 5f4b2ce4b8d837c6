//! The platform's sagas, declared.

use serde::{Deserialize, Serialize};
use skein_contracts::catalog::{
    ReleaseStock, ReserveStock, StockLine, StockRejected, StockReleased, StockReserved,
};
use skein_contracts::orders::{
    ConfirmOrder, MarkCancelled, OrderCancellationRequested, OrderCancelled, OrderConfirmed,
    OrderPlaced, OrderRejected, OrderStatus, RejectOrder,
};
use skein_contracts::payments::{
    AuthorizePayment, PaymentAuthorized, PaymentDeclined, PaymentRefunded, RefundPayment,
};
use skein_message::TypeName;
use skein_saga::{DefinitionError, Saga};
use uuid::Uuid;

use crate::OrchestratorConfig;

/// The data the place-order saga carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The order.
    pub order_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// What to reserve.
    pub lines: Vec<StockLine>,
    /// What to charge, in cents.
    pub total_cents: i64,
}

/// The data the cancel-order saga carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    /// The order.
    pub order_id: Uuid,
    /// Who asked.
    pub requested_by: Uuid,
}

/// Every event type of the platform, `<service>.<name>`.
fn platform_events() -> Vec<String> {
    skein_contracts::registry::all()
        .into_iter()
        .filter(|e| e.kind == skein_contracts::registry::Kind::Event)
        .filter_map(|e| TypeName::parse(&e.type_name).ok())
        .map(|t| t.unversioned())
        .collect()
}

fn rejected_lines(e: &StockRejected) -> String {
    let lines: Vec<String> = e
        .lines
        .iter()
        .map(|l| {
            format!(
                "{} {} (requested {}, available {})",
                l.product_id, l.reason, l.requested, l.available
            )
        })
        .collect();
    format!("stock rejected: {}", lines.join(", "))
}

/// order_placed -> reserve stock -> authorize payment (pivot) -> confirm.
pub fn place_order(config: &OrchestratorConfig) -> Result<Saga, DefinitionError> {
    Saga::builder::<Placement>("place_order")
        .start_on(|e: &OrderPlaced| {
            Some((
                e.order_id.to_string(),
                Placement {
                    order_id: e.order_id,
                    customer_id: e.customer_id,
                    lines: e
                        .lines
                        .iter()
                        .map(|l| StockLine {
                            product_id: l.product_id,
                            quantity: l.quantity,
                        })
                        .collect(),
                    total_cents: e.total_cents,
                },
            ))
        })
        .step("reserve_stock", |s| {
            s.send(|d: &Placement| ReserveStock {
                order_id: d.order_id,
                lines: d.lines.clone(),
            })
            .completes_on::<StockReserved>()
            .fails_on(rejected_lines)
            .compensate(|d: &Placement| ReleaseStock {
                order_id: d.order_id,
                reason: "order not placed".into(),
            })
            .compensation_completes_on::<StockReleased>()
            // As long as the reservation may take: what held up the
            // reservation (catalog slow or down) holds up its release too.
            .compensation_deadline(config.forward_deadline.max(config.reserve_deadline))
            .deadline(config.reserve_deadline)
        })
        .step("authorize_payment", |s| {
            s.pivot()
                .send(|d: &Placement| AuthorizePayment {
                    order_id: d.order_id,
                    customer_id: d.customer_id,
                    amount_cents: d.total_cents,
                })
                .completes_on::<PaymentAuthorized>()
                .fails_on(|e: &PaymentDeclined| format!("payment declined: {}", e.reason))
                .compensate(|d: &Placement| RefundPayment {
                    order_id: d.order_id,
                    reason: "order not placed".into(),
                })
                .compensation_completes_on::<PaymentRefunded>()
                .compensation_deadline(config.forward_deadline.max(config.payment_deadline))
                .deadline(config.payment_deadline)
        })
        .step("confirm_order", |s| {
            s.send(|d: &Placement| ConfirmOrder {
                order_id: d.order_id,
            })
            .completes_on::<OrderConfirmed>()
            .deadline(config.forward_deadline)
            .attempts(config.forward_attempts)
        })
        .cancel_on(|e: &OrderCancellationRequested| {
            (
                e.order_id.to_string(),
                format!("cancelled by {}", e.requested_by),
            )
        })
        .on_compensated(|d: &Placement, reason: &str| RejectOrder {
            order_id: d.order_id,
            reason: reason.to_owned(),
        })
        .on_cancelled(|d: &Placement, reason: &str| MarkCancelled {
            order_id: d.order_id,
            reason: reason.to_owned(),
        })
        // The order ends rejected or cancelled only when orders says so:
        // a final command it refused or dead-lettered leaves the saga
        // failed and listed by `skein saga stuck`, not an order pending
        // for ever behind a saga that looks done.
        .compensated_on::<OrderRejected>()
        .cancelled_on::<OrderCancelled>()
        .final_deadline(config.forward_deadline)
        .final_attempts(config.forward_attempts)
        .known_types(platform_events())
        .build()
}

/// A confirmed order's cancellation: refund (pivot), release, mark cancelled.
pub fn cancel_order(config: &OrchestratorConfig) -> Result<Saga, DefinitionError> {
    Saga::builder::<Cancellation>("cancel_order")
        .start_on(|e: &OrderCancellationRequested| {
            (e.status == OrderStatus::Confirmed).then(|| {
                (
                    e.order_id.to_string(),
                    Cancellation {
                        order_id: e.order_id,
                        requested_by: e.requested_by,
                    },
                )
            })
        })
        .step("refund_payment", |s| {
            s.pivot()
                .send(|d: &Cancellation| RefundPayment {
                    order_id: d.order_id,
                    reason: "order cancelled".into(),
                })
                .completes_on::<PaymentRefunded>()
                .deadline(config.forward_deadline)
                .attempts(config.forward_attempts)
        })
        .step("release_stock", |s| {
            s.send(|d: &Cancellation| ReleaseStock {
                order_id: d.order_id,
                reason: "order cancelled".into(),
            })
            .completes_on::<StockReleased>()
            .deadline(config.forward_deadline)
            .attempts(config.forward_attempts)
        })
        .step("mark_cancelled", |s| {
            s.send(|d: &Cancellation| MarkCancelled {
                order_id: d.order_id,
                reason: format!("cancelled by {}", d.requested_by),
            })
            .completes_on::<OrderCancelled>()
            .deadline(config.forward_deadline)
            .attempts(config.forward_attempts)
        })
        .known_types(platform_events())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_platform_sagas_are_valid() -> Result<(), DefinitionError> {
        let config = OrchestratorConfig::default();
        let place = place_order(&config)?;
        assert_eq!(
            place.step_names().collect::<Vec<_>>(),
            ["reserve_stock", "authorize_payment", "confirm_order"]
        );
        let cancel = cancel_order(&config)?;
        assert_eq!(
            cancel.step_names().collect::<Vec<_>>(),
            ["refund_payment", "release_stock", "mark_cancelled"]
        );
        Ok(())
    }

    #[tokio::test]
    async fn the_orchestrator_refuses_two_sagas_of_one_name_at_start_up(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let config = OrchestratorConfig::default();
        let dir = std::env::temp_dir().join(format!("skein-orchestrator-{}", uuid::Uuid::now_v7()));
        let store = skein_outbox::Store::connect(&format!("sqlite:{}/o.db", dir.display())).await?;
        let err = skein_saga::Coordinator::new(
            vec![place_order(&config)?, place_order(&config)?],
            store,
            "orchestrator",
        )
        .err()
        .ok_or("two sagas of one name were accepted")?;
        assert_eq!(
            err.to_string(),
            "saga place_order: declared twice in one coordinator"
        );
        Ok(())
    }
}
