//! The `lm` stage family (work in progress).
