//! `/v1/sagas/{id}`: a saga instance with its transitions, and
//! `/v1/sagas/{id}/retry`: a failed one sent on again (admins).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use skein_contracts::orchestrator::{GetSaga, ListSagas, RetrySaga, SagaInstance, SagaStatus};
use skein_contracts::Caller;
use skein_message::Query;
use uuid::Uuid;

use super::{json, path_id, PathParam};
use crate::auth::Admin;
use crate::context::RequestContext;
use crate::problem::ApiError;
use crate::state::{AppState, Shared};

/// The instance with id `{id}`, or else the newest saga about the order
/// `{id}` (sagas are keyed by order id), with every transition.
pub(crate) async fn get(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "saga")?;
    by_id_or_order(&state, &ctx, &caller, id, None, |saga_id| GetSaga {
        caller: caller.clone(),
        saga_id,
    })
    .await
}

/// Retries the failed instance with id `{id}`, or else the newest failed
/// saga about the order `{id}`: the command it waits for is sent again with
/// its attempts counted afresh (`skein saga retry`). 409 when the instance
/// is not failed or an answer failed it for good; a retry changes nothing
/// then, so a repeated request is harmless.
pub(crate) async fn retry(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "saga")?;
    let failed = Some(SagaStatus::Failed);
    by_id_or_order(&state, &ctx, &caller, id, failed, |saga_id| RetrySaga {
        caller: caller.clone(),
        saga_id,
    })
    .await
}

/// Asks `query` about the instance `id`; when there is none, about the
/// newest saga about the order `id` (of `status`, when given).
async fn by_id_or_order<Q: Query<Reply = SagaInstance>>(
    state: &AppState,
    ctx: &RequestContext,
    caller: &Caller,
    id: Uuid,
    status: Option<SagaStatus>,
    query: impl Fn(Uuid) -> Q,
) -> Result<Response, ApiError> {
    match state.ask(&query(id), &ctx.message_context()).await {
        Ok(saga) => return Ok(json(StatusCode::OK, &saga)),
        Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let about = ListSagas {
        caller: caller.clone(),
        status,
        key: Some(id.to_string()),
        limit: 1,
        cursor: None,
    };
    let page = state.ask(&about, &ctx.message_context()).await?;
    let newest = page.items.first().ok_or_else(|| {
        ApiError::NotFound(match status {
            Some(status) => format!(
                "no saga {id} and no {} saga about order {id}",
                status.as_str()
            ),
            None => format!("no saga {id} and none about order {id}"),
        })
    })?;
    let saga = state.ask(&query(newest.id), &ctx.message_context()).await?;
    Ok(json(StatusCode::OK, &saga))
}
