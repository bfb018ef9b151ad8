//! algorithms (being written).
