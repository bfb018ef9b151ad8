//! `shared`'s behaviour through its public API, one module per concern. One binary, so the
//! suite links once.

mod algorithms;
mod quota;
mod reference;
mod rules;
mod wire;
