//! The projector's queries: dashboard, profile, timeline.

use std::collections::BTreeMap;

use skein_contracts::identity::User;
use skein_contracts::orders::OrderStatus;
use skein_contracts::projector::{
    Dashboard, GetDashboard, GetProfile, GetTimeline, Profile, ProfileOrder, Timeline,
    TimelineEntry,
};
use skein_contracts::{Role, ServiceError};
use skein_outbox::Store;
use skein_service::Host;
use uuid::Uuid;

use crate::store;

fn internal(e: impl std::fmt::Display) -> ServiceError {
    tracing::error!(error = %e, "projector query failed");
    ServiceError::internal()
}

/// Registers every projector query on `host`.
pub async fn register(host: &mut Host) -> skein_service::Result<()> {
    let s = host.store().clone();
    host.query(move |q: GetDashboard, _| dashboard(s.clone(), q))
        .await?;
    let s = host.store().clone();
    host.query(move |q: GetProfile, _| profile(s.clone(), q))
        .await?;
    let s = host.store().clone();
    host.query(move |q: GetTimeline, _| timeline(s.clone(), q))
        .await?;
    Ok(())
}

const STATUSES: [OrderStatus; 4] = [
    OrderStatus::Pending,
    OrderStatus::Confirmed,
    OrderStatus::Rejected,
    OrderStatus::Cancelled,
];

async fn dashboard(store: Store, q: GetDashboard) -> Result<Dashboard, ServiceError> {
    if q.caller.role != Role::Admin {
        return Err(ServiceError::forbidden("only admins may see the dashboard"));
    }
    let mut tx = store::read_tx(&store).await.map_err(internal)?;
    let totals = store::totals(&mut tx).await.map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    // Every status is present, 0 when no order has it.
    let mut orders_by_status: BTreeMap<String, i64> = STATUSES
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut total_orders = 0;
    let mut revenue_cents = 0;
    for (status, count, cents) in totals.by_status {
        total_orders += count;
        if status == OrderStatus::Confirmed.as_str() {
            revenue_cents += cents;
        }
        *orders_by_status.entry(status).or_insert(0) += count;
    }
    Ok(Dashboard {
        total_users: totals.users,
        total_orders,
        orders_by_status,
        revenue_cents,
    })
}

async fn profile(store: Store, q: GetProfile) -> Result<Profile, ServiceError> {
    // Authorization first: a customer learns nothing about whether another
    // user exists.
    if !q.caller.may_access(q.user_id) {
        return Err(ServiceError::forbidden(
            "a customer may only see their own profile",
        ));
    }
    let mut tx = store::read_tx(&store).await.map_err(internal)?;
    let user = store::user(&mut tx, q.user_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ServiceError::not_found(format!("no user {}", q.user_id)))?;
    let rows = store::orders_of(&mut tx, q.user_id)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    let user = User {
        id: q.user_id,
        email: user.email,
        name: user.name,
        role: store::parse_role(&user.role)
            .ok_or_else(|| internal(format!("user {} has role {:?}", q.user_id, user.role)))?,
        created_at: user.created_at,
    };
    let mut orders = Vec::with_capacity(rows.len());
    let mut spent_cents = 0;
    for (id, status, total_cents) in rows {
        let status = store::parse_status(&status)
            .ok_or_else(|| internal(format!("order {id} has status {status:?}")))?;
        if status == OrderStatus::Confirmed {
            spent_cents += total_cents;
        }
        orders.push(ProfileOrder {
            order_id: Uuid::parse_str(&id).map_err(internal)?,
            status,
            total_cents,
        });
    }
    Ok(Profile {
        user,
        order_count: i64::try_from(orders.len()).unwrap_or(i64::MAX),
        orders,
        spent_cents,
    })
}

async fn timeline(store: Store, q: GetTimeline) -> Result<Timeline, ServiceError> {
    let not_found = || ServiceError::not_found(format!("no order {}", q.order_id));
    let mut tx = store::read_tx(&store).await.map_err(internal)?;
    let owner = store::order_owner(&mut tx, q.order_id)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let owner = Uuid::parse_str(&owner).map_err(internal)?;
    // Another customer's order is "not found": its existence does not leak.
    if !q.caller.may_access(owner) {
        return Err(not_found());
    }
    let rows = store::timeline_of(&mut tx, q.order_id)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    let entries = rows
        .into_iter()
        .map(|r| {
            Ok(TimelineEntry {
                kind: r.kind,
                time: r.event_time,
                event_id: Uuid::parse_str(&r.event_id).map_err(internal)?,
            })
        })
        .collect::<Result<_, ServiceError>>()?;
    Ok(Timeline {
        order_id: q.order_id,
        entries,
    })
}
