//! `/v1/users/{id}/profile` and `/v1/dashboard`: the projector's read models.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use skein_contracts::projector::{GetDashboard, GetProfile};

use super::{json, path_id, PathParam};
use crate::auth::{Admin, User};
use crate::context::RequestContext;
use crate::problem::ApiError;
use crate::state::Shared;

pub(crate) async fn profile(
    State(state): State<Shared>,
    ctx: RequestContext,
    User(caller): User,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let user_id = path_id(&id, "user")?;
    // Another customer's profile does not exist as far as this caller knows.
    if !caller.may_access(user_id) {
        return Err(ApiError::NotFound(format!("no user {user_id}")));
    }
    let own = caller.user_id == user_id;
    let profile = match state
        .ask(&GetProfile { caller, user_id }, &ctx.message_context())
        .await
    {
        // The caller's token says the user exists: the projector has not
        // applied the registration yet (a moment after registering).
        Err(ApiError::NotFound(_)) if own => {
            return Err(ApiError::NotYet(format!(
                "the profile of user {user_id} is not built yet (read models follow a \
                 registration within moments); retry"
            )))
        }
        answer => answer?,
    };
    Ok(json(StatusCode::OK, &profile))
}

pub(crate) async fn dashboard(
    State(state): State<Shared>,
    ctx: RequestContext,
    Admin(caller): Admin,
) -> Result<Response, ApiError> {
    let dashboard = state
        .ask(&GetDashboard { caller }, &ctx.message_context())
        .await?;
    Ok(json(StatusCode::OK, &dashboard))
}
