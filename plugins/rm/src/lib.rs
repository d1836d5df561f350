//! The `rm` stage family: reward models (work in progress).
