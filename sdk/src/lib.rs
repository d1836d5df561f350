//! The hone SDK: everything a stage author depends on.
//!
//! A stage is a plain Rust type implementing [`Stage`] and [`StageFactory`];
//! [`export_stages!`] turns a list of them into a plugin library that the
//! `hone` runtime loads with `libloading`. The C ABI, bincode batches, panic
//! containment and memory ownership are this crate's business, not the
//! author's.
//!
//! ```
//! use hone_sdk::prelude::*;
//!
//! /// Upper-cases every prompt.
//! struct Shout;
//!
//! impl StageFactory for Shout {
//!     fn descriptor() -> StageDescriptor {
//!         StageDescriptor::new("example.shout", "Upper-cases every prompt.")
//!             .input("prompts", RecordKind::Prompt)
//!             .output("prompts", RecordKind::Prompt)
//!     }
//!     fn create(_init: &StageInit) -> Result<Self, StageError> {
//!         Ok(Shout)
//!     }
//! }
//!
//! impl Stage for Shout {
//!     fn on_batch(&mut self, ctx: &mut Context, _port: usize, batch: Vec<Record>) -> Result<(), StageError> {
//!         for record in batch {
//!             if let Record::Prompt(mut p) = record {
//!                 p.text = p.text.to_uppercase();
//!                 ctx.emit(0, Record::Prompt(p));
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! hone_sdk::export_stages!(Shout);
//! ```

pub mod abi;
mod context;
mod describe;
mod error;
pub mod feedback;
pub mod fs;
pub mod pretrained;
pub mod records;
pub mod round;
pub mod snapshot;
mod stage;
pub mod testing;
pub mod text;

pub use context::{round_output_dir, Checkpoint, Collected, Context, Event, HostLink};
pub use describe::{one_of, ConfigField, FieldType, Placement, Port, StageDescriptor};
pub use error::StageError;
pub use records::{
    ArtifactKind, ArtifactRef, Completion, PreferencePair, Prompt, Record, RecordKind, Score,
};
pub use round::RoundInput;
pub use stage::{Stage, StageFactory, StageInit};

/// The SDK's semantic version, exchanged in the plugin handshake.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

#[doc = include_str!("../../docs/plugin-guide.md")]
pub mod guide {}

/// The names most stage code needs.
pub mod prelude {
    pub use crate::{
        ArtifactKind, ArtifactRef, Checkpoint, Completion, ConfigField, Context, FieldType,
        Placement, PreferencePair, Prompt, Record, RecordKind, RoundInput, Score, Stage,
        StageDescriptor, StageError, StageFactory, StageInit,
    };
}
