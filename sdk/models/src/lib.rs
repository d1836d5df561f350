//! hone's model core (work in progress).
