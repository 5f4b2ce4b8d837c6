//! JSON bodies: checked before anything is sent anywhere.
//!
//! `Json<T>` refuses, in this order: a content type that is not JSON (415),
//! a body over the limit (413), bytes that are not JSON (400), and then a body
//! that breaks `T`'s JSON Schema (unknown fields, wrong types, missing
//! fields, ranges) or its contract rules ([`Validate`]) with 422 listing every
//! violation with its JSON pointer. A refused body has no effect.

use std::sync::OnceLock;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use jsonschema::error::ValidationErrorKind;
use jsonschema::Validator;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use skein_contracts::{Validate, Violation};

use crate::problem::ApiError;
use crate::state::Shared;

/// A request body type: its schema and its rules.
pub(crate) trait Body: DeserializeOwned + JsonSchema + Validate + Send + 'static {
    /// The compiled schema of the type (one per type, built once).
    fn validator() -> &'static Validator;
}

/// Implements [`Body`] for types with a schema and rules.
macro_rules! body {
    ($($ty:ty),* $(,)?) => {$(
        impl $crate::body::Body for $ty {
            fn validator() -> &'static jsonschema::Validator {
                static V: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
                $crate::body::compiled::<$ty>(&V)
            }
        }
    )*};
}
pub(crate) use body;

/// Compiles `T`'s schema into `cell` once.
///
/// # Panics
///
/// When the schema derived from a type of this crate does not compile: a
/// programming error that every test hits at once.
pub(crate) fn compiled<T: JsonSchema>(cell: &'static OnceLock<Validator>) -> &'static Validator {
    cell.get_or_init(|| {
        let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
        #[allow(clippy::expect_used)]
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("the schema of a body type compiles")
    })
}

/// A validated JSON body.
#[derive(Debug)]
pub(crate) struct Json<T>(pub(crate) T, pub(crate) Bytes);

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn pointer_escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Every violation of `value` against `T`'s schema, then `T`'s rules.
pub(crate) fn violations<T: Body>(value: &serde_json::Value) -> Result<T, Vec<Violation>> {
    let mut found = Vec::new();
    for error in T::validator().iter_errors(value) {
        let at = error.instance_path().to_string();
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                for name in unexpected {
                    found.push(Violation {
                        field: format!("{at}/{}", pointer_escape(name)),
                        message: "unknown field".into(),
                    });
                }
            }
            ValidationErrorKind::Required { property } => found.push(Violation {
                field: format!("{at}/{}", pointer_escape(property.as_str().unwrap_or(""))),
                message: "is required".into(),
            }),
            ValidationErrorKind::Type { kind } => found.push(Violation {
                field: at,
                message: format!("must be of type {}", type_names(kind)),
            }),
            ValidationErrorKind::Format { format } => found.push(Violation {
                field: at,
                message: format!("must be a valid {format}"),
            }),
            _ => found.push(Violation {
                field: at,
                message: error.to_string(),
            }),
        }
    }
    let parsed = serde_path_to_error::deserialize::<_, T>(value);
    match parsed {
        Ok(body) => {
            for v in body.violations() {
                if !found.iter().any(|f| f.field == v.field) {
                    found.push(v);
                }
            }
            if found.is_empty() {
                Ok(body)
            } else {
                Err(found)
            }
        }
        Err(e) => {
            if found.is_empty() {
                // The schema is looser than serde somewhere: still precise.
                let path = e.path().to_string();
                found.push(Violation {
                    field: if path == "." {
                        String::new()
                    } else {
                        format!("/{}", path.replace('.', "/"))
                    },
                    message: "has an invalid value".into(),
                });
            }
            Err(found)
        }
    }
}

fn type_names(kind: &jsonschema::error::TypeKind) -> String {
    use jsonschema::error::TypeKind;
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(ts) => ts
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

impl<T: Body> FromRequest<Shared> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.config.body_limit;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let within = state.config.body_timeout;
        let bytes = tokio::time::timeout(within, axum::body::to_bytes(request.into_body(), limit))
            .await
            .map_err(|_| ApiError::BodyTimeout(within))?
            .map_err(|_| ApiError::PayloadTooLarge(limit))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::MalformedJson(format!(
                "line {} column {}: {}",
                e.line(),
                e.column(),
                json_reason(&e)
            ))
        })?;
        violations::<T>(&value)
            .map(|body| Json(body, bytes))
            .map_err(ApiError::Invalid)
    }
}

fn json_reason(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => "unexpected end of input",
        Category::Syntax => "syntax error",
        Category::Data => "invalid data",
        Category::Io => "unreadable body",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
