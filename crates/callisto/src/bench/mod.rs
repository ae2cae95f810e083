//! `callisto bench`: load generators that measure Callisto against its
//! peers on this machine, side by side in one run. Benchmarks report; they
//! never assert (see docs/benchmarks.md for the recorded figures).

pub mod forwarder;
pub mod turn;
pub mod uclient;
