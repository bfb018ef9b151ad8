//! quota (being written).
