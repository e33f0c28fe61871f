//! primad as a library: the service (`serve`), its HTTP API, the durable
//! store, the inference worker and the model catalog. The binary in
//! `main.rs` adds the command line and the engine tools.

pub mod api;
pub mod catalog;
pub mod cluster;
pub mod error;
pub mod events;
pub mod gpu;
pub mod memory;
pub mod modelprof;
pub mod profiler;
pub mod ring;
pub mod serve;
pub mod service;
pub mod store;
pub mod synth;
pub mod worker;
