//! Criterion micro-benchmarks live in `benches/micro.rs`; `cargo xtask bench` runs them and folds
//! their estimates into docs/benchmarks.md. This crate has no library code of its own.
