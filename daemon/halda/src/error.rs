//! Errors returned by the scheduler. Every variant carries the numbers that
//! explain it, so a `primad plan` user can see which input is at fault.

use thiserror::Error;

/// Everything that can go wrong while validating inputs, solving or
/// evaluating a plan. Nothing in this crate panics on bad input; it returns
/// one of these instead.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum HaldaError {
    /// The device list is empty.
    #[error("no devices given: at least the head device (index 0) is needed")]
    NoDevices,

    /// Two devices share a name, which makes network links ambiguous.
    #[error("device name {name:?} appears more than once (indices {first} and {second})")]
    DuplicateDevice {
        /// The repeated name.
        name: String,
        /// First index with that name.
        first: usize,
        /// Second index with that name.
        second: usize,
    },

    /// A model field is out of range (zero layers, non-finite FLOPs, ...).
    #[error("model profile: {field} is invalid ({value}): {why}")]
    InvalidModel {
        /// Field name as in the JSON format.
        field: String,
        /// The offending value, printed.
        value: String,
        /// What the value must satisfy.
        why: &'static str,
    },

    /// A device field is out of range.
    #[error("device {device:?}: {field} is invalid ({value}): {why}")]
    InvalidDevice {
        /// Device name.
        device: String,
        /// Field name as in the JSON format.
        field: String,
        /// The offending value, printed.
        value: String,
        /// What the value must satisfy.
        why: &'static str,
    },

    /// The model has layers of a weight type for which the device has no
    /// throughput figure (the profiler only measures types present in the
    /// model, so a mismatch means the profile belongs to another model).
    #[error("device {device:?} has no {unit} throughput for weight type {weight_type:?}, which the model uses ({flops:.3e} FLOPs per layer)")]
    MissingThroughput {
        /// Device name.
        device: String,
        /// "CPU" or "GPU".
        unit: &'static str,
        /// ggml weight type name, e.g. `q4_k`.
        weight_type: String,
        /// FLOPs of that type per layer.
        flops: f64,
    },

    /// A forced or maximum `k` is unusable for this model.
    #[error("k = {k} is not usable with L = {layers} layers: {why}")]
    BadK {
        /// The requested number of rounds.
        k: u32,
        /// Number of model layers.
        layers: u32,
        /// Reason (not a divisor, zero, ...).
        why: String,
    },

    /// Options are inconsistent (e.g. a non-positive master priority).
    #[error("invalid option {option}: {why}")]
    InvalidOption {
        /// Option name.
        option: &'static str,
        /// Explanation with the value.
        why: String,
    },

    /// No plan satisfies the constraints for any candidate `k`.
    #[error("no feasible plan ({mode}): {detail}")]
    Infeasible {
        /// Which algorithm gave up ("shipped" or "optimal").
        mode: &'static str,
        /// Human-readable explanation naming the binding numbers.
        detail: String,
    },

    /// The MILP backend failed for a reason other than infeasibility.
    #[error("MILP solver failed for k = {k}: {message}")]
    Solver {
        /// The k whose program failed.
        k: u32,
        /// Backend message.
        message: String,
    },

    /// A plan handed to [`crate::evaluate`] is malformed or breaks a hard
    /// limit (VRAM, resident anonymous memory).
    #[error("invalid plan: {0}")]
    InvalidPlan(String),

    /// The paper-testbed JSON (or a device file) could not be parsed.
    #[error("cannot parse JSON: {0}")]
    Json(String),
}

impl From<serde_json::Error> for HaldaError {
    fn from(e: serde_json::Error) -> Self {
        HaldaError::Json(e.to_string())
    }
}

/// Convenience alias used throughout the crate.
pub type Result<T> = std::result::Result<T, HaldaError>;
