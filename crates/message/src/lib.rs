//! The skein message envelope and typed message contracts.
//!
//! Every message on the bus is a [CloudEvents 1.0] event in the NATS protocol
//! binding's *binary content mode*: each attribute travels as a `ce-<name>`
//! header and the payload is the JSON data, unwrapped.
//!
//! # Layout
//!
//! - [`envelope`]: [`Envelope`], the attributes and payload of one message,
//!   encoded to and decoded from NATS headers, and [`MessageContext`], the
//!   correlation and causation a message inherits from the one that caused it.
//! - [`contract`]: the traits a service implements once per message type
//!   ([`Command`], [`Event`], [`Query`]) and that give it its `ce-type`, its
//!   NATS subject and typed encode/decode with upcasting of older versions.
//! - [`subject`]: the subject naming scheme (`events.<service>.<entity>.<name>`,
//!   `commands.<service>.<name>`, `queries.<service>.<name>`) and its validation.
//! - [`error`]: what can go wrong decoding a message, one variant per cause.
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use skein_message::{Contract, Envelope, Event, MessageContext};
//!
//! #[derive(Debug, Serialize, Deserialize, PartialEq)]
//! struct OrderPlaced {
//!     order_id: String,
//!     total_cents: i64,
//! }
//!
//! impl Contract for OrderPlaced {
//!     const SERVICE: &'static str = "orders";
//!     const NAME: &'static str = "order_placed";
//!     const VERSION: u32 = 1;
//! }
//!
//! impl Event for OrderPlaced {
//!     fn entity_id(&self) -> String {
//!         self.order_id.clone()
//!     }
//! }
//!
//! let placed = OrderPlaced { order_id: "o-1".into(), total_cents: 1250 };
//! let envelope = Envelope::event("orders", &placed, &MessageContext::root())?;
//! assert_eq!(envelope.kind, "orders.order_placed.v1");
//! assert_eq!(envelope.nats_subject, "events.orders.o-1.order_placed");
//!
//! // Over the wire and back.
//! let headers = envelope.headers();
//! let decoded = Envelope::from_parts(&envelope.nats_subject, Some(&headers), envelope.data.clone())?;
//! assert_eq!(decoded.decode::<OrderPlaced>()?, placed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md

pub mod contract;
pub mod envelope;
pub mod error;
pub mod subject;

pub use contract::{Command, Contract, Event, Query, TypeName};
pub use envelope::{new_id, Envelope, MessageContext};
pub use error::{DecodeError, EncodeError};
