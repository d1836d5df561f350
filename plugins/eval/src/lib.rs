//! The `eval` stage family (work in progress).
