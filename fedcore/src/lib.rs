//! # fedcore
//!
//! Mekong's protocol and math as pure state machines and functions. No network, no async
//! runtime, no clock: callers pass time and randomness in, feed messages in and get decisions
//! out, so every behaviour can be driven deterministically in tests (in the manner of
//! quinn-proto or rustls).
//!
//! - [`adapter`]: LoRA adapters (A r×k, B d×r), FFA-LoRA initialisation from a shared seed.
//! - [`manifest`]: hashed layouts that flatten adapters to one f32 vector and back.
//! - [`peft`]: the Hugging Face PEFT on-disk format as byte-level codecs.
//! - [`aggregate`]: sample-weighted FedAvg of FFA-LoRA updates, folded as they arrive.
//! - [`update`]: the one place an update is encoded and checked before aggregation.
//! - [`round`]: the round coordinator state machine the aggregator drives, with secure
//!   aggregation on by default, and the participant's secure upload.
//! - [`plan`]: the federation plan both sides agree on.
//! - [`privacy`]: differential privacy, starting with the RDP accountant.
//! - [`strategy`]: aggregation modes (FFA-LoRA, FedSVD, FedIT, HetLoRA, FedSA-LoRA, RoLoRA,
//!   FedEx-LoRA, FLoRA), server optimizers, participant sampling and FedProx.
//! - [`roster`]: the provisioned labs and their identity keys.
//! - [`secagg`]: secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbourhoods): masks,
//!   Shamir shares, quantisation, crypto, and both sides of the protocol as state machines.

pub mod adapter;
pub mod aggregate;
pub mod architecture;
pub mod error;
pub mod manifest;
pub mod peft;
pub mod plan;
pub mod privacy;
pub mod roster;
pub mod round;
pub mod secagg;
pub mod strategy;
pub mod update;

pub use adapter::{AdapterConfig, LoraAdapter, LoraModule, Matrix, ModuleShape, TargetModule};
pub use architecture::{Architecture, Gemma3Layout};
pub use error::{AdapterError, ConfigError};
pub use manifest::{LayoutManifest, TensorSlot};
pub use plan::{
    FederationPlan, LocalOptimizer, LoraSpec, LrSchedule, ModelSpec, RopeScaling, RoundSpec,
    TrainingSpec,
};
pub use round::{Coordinator, Event, RoundError, RoundRecord, Task, WaitReason};
pub use strategy::{AggregationMode, Strategy, StrategyError, StrategySpec};
pub use update::{SubmittedUpdate, UpdateError, UpdatePayload};
