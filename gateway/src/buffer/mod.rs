//! Stage two of the gateway: samples become batches (`batcher`) and every
//! sample is committed to the on-disk [`Buffer`] before anything tries to
//! send it. The buffer is the gateway's only durable state; [`Buffer`]'s
//! module (`store.rs`) states its on-disk format, its limits and its
//! deletion rule.

pub(crate) mod batcher;
mod store;

pub use store::{
    AckApplied, Buffer, BufferError, BufferLimits, BufferMeta, MovedAside, WhenFull,
    DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, MIN_MAX_BYTES,
};
