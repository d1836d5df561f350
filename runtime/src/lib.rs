//! The hone runtime: reads pipeline files, loads stage plugins through the
//! SDK's C ABI, and runs them as a timely dataflow.
//!
//! The binary (`hone`) is a thin CLI over [`cli`]; the library exists so
//! that benchmarks and tests can drive the same code.

pub mod allocator;
pub mod annotate;
pub mod cli;
pub mod cluster;
pub mod dataflow;
pub mod diag;
pub mod graph;
pub mod html_report;
pub mod kernel_threads;
pub mod last_breath;
pub mod pipeline;
pub mod plugin;
pub mod report;
pub mod rundir;
pub mod scaffold;
pub mod serve;
pub mod snapshots;
pub mod telemetry;
