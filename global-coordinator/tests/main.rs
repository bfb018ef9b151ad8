//! The coordinator's tests: one binary (each extra test binary is another link on two cores).

mod binary;
mod regions;
