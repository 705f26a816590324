//! Synthetic sources that drive a producer, one folder per source (`orderbook`).
//!
//! Talks to a [`crate::Producer`] only.

pub mod orderbook;
