//! Subject naming. These names are contracts: consumers filter on them, streams
//! capture them and operators replay by them, so changing one orphans history.
//!
//! - events: `events.<service>.<entity_id>.<name>`, one entity's history is
//!   `events.<service>.<entity_id>.>` away;
//! - commands: `commands.<service>.<name>`;
//! - queries: `queries.<service>.<name>` (core NATS request-reply).

/// Prefix of every event subject; the `EVENTS` stream captures `events.>`.
pub const EVENTS_PREFIX: &str = "events";
/// Prefix of every command subject; the `COMMANDS` stream captures `commands.>`.
pub const COMMANDS_PREFIX: &str = "commands";
/// Prefix of every query subject.
pub const QUERIES_PREFIX: &str = "queries";
/// Prefix of every dead-letter subject; the `DLQ` stream captures `dlq.>`.
pub const DLQ_PREFIX: &str = "dlq";

/// Subject of an event about `entity_id`.
pub fn event(service: &str, entity_id: &str, name: &str) -> String {
    format!("{EVENTS_PREFIX}.{service}.{entity_id}.{name}")
}

/// Subject of a command handled by `service`.
pub fn command(service: &str, name: &str) -> String {
    format!("{COMMANDS_PREFIX}.{service}.{name}")
}

/// Subject of a query answered by `service`.
pub fn query(service: &str, name: &str) -> String {
    format!("{QUERIES_PREFIX}.{service}.{name}")
}

/// Checks that `token` can stand as one token of a NATS subject.
///
/// Returns why it cannot: NATS splits subjects on `.`, treats `*` and `>` as
/// wildcards, and forbids whitespace.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("must not be empty");
    }
    if token.len() > 256 {
        return Err("must be at most 256 bytes");
    }
    if token.contains('.') {
        return Err("must not contain '.'");
    }
    if token.contains(['*', '>']) {
        return Err("must not contain the wildcards '*' or '>'");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    Ok(())
}

/// The entity token of an event subject (`events.<service>.<entity>.<name>`),
/// or `None` for any other subject.
pub fn entity_of_event(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some(EVENTS_PREFIX), Some(_), Some(entity), Some(_)) => Some(entity),
        _ => None,
    }
}

/// Whether `subject` matches the NATS subject `filter`: `*` stands for one
/// token, a final `>` for one or more.
///
/// A consumer takes exactly the messages its filters match; this tells
/// outside the server which consumers take a message (for redelivering and
/// auditing).
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    let mut parts = filter.split('.').peekable();
    while let Some(part) = parts.next() {
        if part == ">" && parts.peek().is_none() {
            return tokens.next().is_some_and(|t| !t.is_empty());
        }
        match tokens.next() {
            Some(token) if !token.is_empty() && (part == "*" || part == token) => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_naming_scheme() {
        assert_eq!(
            event("orders", "o1", "order_placed"),
            "events.orders.o1.order_placed"
        );
        assert_eq!(
            command("catalog", "reserve_stock"),
            "commands.catalog.reserve_stock"
        );
        assert_eq!(query("orders", "get_order"), "queries.orders.get_order");
        assert_eq!(entity_of_event("events.orders.o1.order_placed"), Some("o1"));
        assert_eq!(entity_of_event("commands.orders.place"), None);
    }

    #[test]
    fn filters_match_like_the_server() {
        assert!(matches("events.orders.>", "events.orders.o1.order_placed"));
        assert!(matches("events.*.o1.>", "events.orders.o1.order_placed"));
        assert!(matches(
            "events.identity.*.user_registered",
            "events.identity.u1.user_registered"
        ));
        assert!(matches(
            "commands.catalog.reserve_stock",
            "commands.catalog.reserve_stock"
        ));
        assert!(matches(">", "dlq.EVENTS.orders"));
        assert!(!matches("events.orders.>", "events.orders"));
        assert!(!matches(
            "events.orders.>",
            "events.catalog.p1.product_added"
        ));
        assert!(!matches(
            "events.identity.*.user_registered",
            "events.identity.u1.user_registered.extra"
        ));
        assert!(!matches("events.*", "events.orders.o1"));
        assert!(!matches("commands.catalog.x", "commands.catalog"));
    }

    #[test]
    fn tokens_that_would_change_the_subject_shape_are_refused() {
        assert!(check_token("0192f7a0-aaaa").is_ok());
        assert!(check_token("").is_err());
        assert!(check_token("a.b").is_err());
        assert!(check_token("a*").is_err());
        assert!(check_token(">").is_err());
        assert!(check_token("a b").is_err());
        assert!(check_token(&"x".repeat(300)).is_err());
    }
}
