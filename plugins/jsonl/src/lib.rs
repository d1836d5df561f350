//! The `jsonl` stage family: reads prompts and preference pairs from
//! `.jsonl`, `.jsonl.gz` and JSON-array files, and writes any records back.
//!
//! Formats:
//! - `hh-rlhf`: `{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`, split into
//!   prompt and responses at the last `\n\nAssistant:`.
//! - `trl`: `{"prompt", "chosen", "rejected"}` (strings or chat message
//!   lists), with optional `score_chosen` / `score_rejected`.
//! - `pandalm`: three-annotator records; majority vote, ties dropped and counted.

mod formats;
mod read;
mod write;

pub use read::{ReadPairs, ReadPrompts};
pub use write::Write;

hone_sdk::export_stages!(ReadPairs, ReadPrompts, Write);
