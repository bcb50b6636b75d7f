//! Stage two of the gateway: samples become batches (`batcher`) and every
//! batch is written to the on-disk [`Buffer`] before anything tries to send
//! it. The buffer is the gateway's only durable state; [`Buffer`]'s module
//! (`store.rs`) states its on-disk format and deletion rule.

pub(crate) mod batcher;
mod store;

pub use store::{Buffer, BufferError, BufferMeta};
