//! `/v1/sagas/{id}`: a saga instance with its transitions, and
//! `/v1/sagas/{id}/retry`: a failed one sent on again (admins).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use skein_contracts::orchestrator::{GetSaga, ListSagas, RetrySaga, SagaStatus};

use super::{json, path_id, PathParam};
use crate::auth::Admin;
use crate::context::RequestContext;
use crate::problem::ApiError;
use crate::state::Shared;

/// The instance with id `{id}`, or else the newest saga about the order
/// `{id}` (sagas are keyed by order id), with every transition.
pub(crate) async fn get(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "saga")?;
    let by_id = GetSaga {
        caller: caller.clone(),
        saga_id: id,
    };
    match state.ask(&by_id, &ctx.request_id).await {
        Ok(saga) => return Ok(json(StatusCode::OK, &saga)),
        Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let about = ListSagas {
        caller: caller.clone(),
        status: None,
        key: Some(id.to_string()),
        limit: 1,
        cursor: None,
    };
    let page = state.ask(&about, &ctx.request_id).await?;
    let newest = page
        .items
        .first()
        .ok_or_else(|| ApiError::NotFound(format!("no saga {id} and none about order {id}")))?;
    let saga = state
        .ask(
            &GetSaga {
                caller,
                saga_id: newest.id,
            },
            &ctx.request_id,
        )
        .await?;
    Ok(json(StatusCode::OK, &saga))
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
    let by_id = RetrySaga {
        caller: caller.clone(),
        saga_id: id,
    };
    match state.ask(&by_id, &ctx.request_id).await {
        Ok(saga) => return Ok(json(StatusCode::OK, &saga)),
        Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let about = ListSagas {
        caller: caller.clone(),
        status: Some(SagaStatus::Failed),
        key: Some(id.to_string()),
        limit: 1,
        cursor: None,
    };
    let page = state.ask(&about, &ctx.request_id).await?;
    let failed = page.items.first().ok_or_else(|| {
        ApiError::NotFound(format!("no saga {id} and no failed saga about order {id}"))
    })?;
    let saga = state
        .ask(
            &RetrySaga {
                caller,
                saga_id: failed.id,
            },
            &ctx.request_id,
        )
        .await?;
    Ok(json(StatusCode::OK, &saga))
}
