//! Messages of a "shop" service for the saga tests: commands and events
//! that carry only the id of their entity. One file for the unit tests
//! (`src/lib.rs` includes it as `test_messages`) and the integration tests
//! (`tests/coordinator.rs`); each uses part of it.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use skein_message::{Command, Contract, Event};

macro_rules! message {
    ($t:ident, $name:literal, $kind:ident) => {
        #[derive(Debug, Serialize, Deserialize)]
        pub(crate) struct $t {
            pub(crate) id: String,
        }
        impl Contract for $t {
            const SERVICE: &'static str = "shop";
            const NAME: &'static str = $name;
            const VERSION: u32 = 1;
        }
        impl $kind for $t {
            fn entity_id(&self) -> String {
                self.id.clone()
            }
        }
    };
}
message!(Placed, "placed", Event);
message!(Stop, "stop", Event);
message!(Reserve, "reserve", Command);
message!(Reserved, "reserved", Event);
message!(Refused, "refused", Event);
message!(Release, "release", Command);
message!(Released, "released", Event);
message!(Pay, "pay", Command);
message!(Paid, "paid", Event);
message!(Declined, "declined", Event);
message!(Refund, "refund", Command);
message!(Refunded, "refunded", Event);
message!(Ship, "ship", Command);
message!(Shipped, "shipped", Event);
message!(Lost, "lost", Event);
message!(Notify, "notify", Command);
message!(Notified, "notified", Event);
message!(Reject, "reject", Command);
message!(Rejected, "rejected", Event);
message!(Stopped, "stopped", Event);
