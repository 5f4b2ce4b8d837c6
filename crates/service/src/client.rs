//! The client side of queries.

use std::time::Duration;

use skein_bus::Bus;
use skein_contracts::ServiceError;
use skein_message::{envelope::headers, MessageContext, Query};

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The service answered with an error.
    #[error("{0}")]
    Service(ServiceError),
    /// No copy of the service is running.
    #[error("no {0} service is running")]
    NoResponders(String),
    /// The service did not answer in time.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The request could not be sent.
    #[error("cannot send the request: {0}")]
    Transport(String),
    /// The answer is not what the contract says.
    #[error("invalid answer from {service}: {reason}")]
    BadReply {
        /// The service.
        service: String,
        /// What is wrong.
        reason: String,
    },
}

/// Sends `query` and waits up to 5 s for the answer.
pub async fn request<Q: Query>(bus: &Bus, query: &Q) -> Result<Q::Reply, RequestError> {
    request_with(bus, query, None, Duration::from_secs(5)).await
}

/// Sends `query` with a correlation id and a timeout.
pub async fn request_with<Q: Query>(
    bus: &Bus,
    query: &Q,
    correlation_id: Option<&str>,
    timeout: Duration,
) -> Result<Q::Reply, RequestError> {
    let context = correlation_id.map(MessageContext::with_correlation);
    request_in(bus, query, context.as_ref(), timeout).await
}

/// Sends `query` as part of `context` (its correlation id and W3C
/// `traceparent`, which the service's handler continues in what it sends)
/// with a timeout.
pub async fn request_in<Q: Query>(
    bus: &Bus,
    query: &Q,
    context: Option<&MessageContext>,
    timeout: Duration,
) -> Result<Q::Reply, RequestError> {
    let subject = skein_message::subject::query(Q::SERVICE, Q::NAME);
    let payload = serde_json::to_vec(query).map_err(|e| RequestError::Transport(e.to_string()))?;
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::TYPE, Q::type_name().to_string().as_str());
    if let Some(context) = context {
        h.insert(headers::CORRELATION_ID, context.correlation_id.as_str());
        if let Some(traceparent) = &context.traceparent {
            h.insert(headers::TRACEPARENT, traceparent.as_str());
        }
    }
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(h)
        .timeout(Some(timeout));
    let answer = bus
        .client()
        .send_request(subject, request)
        .await
        .map_err(|e| {
            use async_nats::RequestErrorKind as K;
            match e.kind() {
                K::NoResponders => RequestError::NoResponders(Q::SERVICE.to_owned()),
                K::TimedOut => RequestError::Timeout(Q::SERVICE.to_owned(), timeout),
                _ => RequestError::Transport(e.to_string()),
            }
        })?;
    if let Some(h) = &answer.headers {
        if let Some(code) = h.get(async_nats::service::NATS_SERVICE_ERROR_CODE) {
            let status = code.as_str().parse().unwrap_or(500);
            let message = h
                .get(async_nats::service::NATS_SERVICE_ERROR)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            return Err(RequestError::Service(ServiceError { status, message }));
        }
    }
    serde_json::from_slice(&answer.payload).map_err(|e| RequestError::BadReply {
        service: Q::SERVICE.to_owned(),
        reason: e.to_string(),
    })
}

/// The newest `limit` saga instances about `key` (an order id, say), with
/// their transitions, oldest first, asked of the orchestrator as the
/// operator: a list, then each instance. One deleted between the two
/// (past its retention) is left out.
pub async fn sagas_about(
    bus: &Bus,
    key: &str,
    limit: u32,
    timeout: Duration,
) -> Result<Vec<skein_contracts::orchestrator::SagaInstance>, RequestError> {
    use skein_contracts::orchestrator::{GetSaga, ListSagas};
    use skein_contracts::Caller;
    let list = ListSagas {
        caller: Caller::operator(),
        status: None,
        key: Some(key.to_owned()),
        limit,
        cursor: None,
    };
    let page = request_with(bus, &list, None, timeout).await?;
    let mut instances = Vec::with_capacity(page.items.len());
    for item in page.items.into_iter().rev() {
        let get = GetSaga {
            caller: Caller::operator(),
            saga_id: item.id,
        };
        match request_with(bus, &get, None, timeout).await {
            Ok(instance) => instances.push(instance),
            Err(RequestError::Service(e)) if e.status == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(instances)
}
