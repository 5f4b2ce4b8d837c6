/// Implements `Contract` (and `Event`/`Command` with the entity field, or
/// `Query` with its reply) for a payload type.
macro_rules! contract {
    (event $ty:ty, $service:literal, $name:literal, v $version:literal, entity = $entity:ident) => {
        contract!(@base $ty, $service, $name, $version);
        impl skein_message::Event for $ty {
            fn entity_id(&self) -> String {
                self.$entity.to_string()
            }
        }
    };
    (command $ty:ty, $service:literal, $name:literal, v $version:literal, entity = $entity:ident) => {
        contract!(@base $ty, $service, $name, $version);
        impl skein_message::Command for $ty {
            fn entity_id(&self) -> String {
                self.$entity.to_string()
            }
        }
    };
    (query $ty:ty, $service:literal, $name:literal, v $version:literal, reply = $reply:ty) => {
        contract!(@base $ty, $service, $name, $version);
        impl skein_message::Query for $ty {
            type Reply = $reply;
        }
    };
    (@base $ty:ty, $service:literal, $name:literal, $version:literal) => {
        impl skein_message::Contract for $ty {
            const SERVICE: &'static str = $service;
            const NAME: &'static str = $name;
            const VERSION: u32 = $version;
        }
    };
}
