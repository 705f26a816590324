//! deltasync's NATS layer: every call to async-nats the pipeline makes about its stream and
//! bucket. `connect` (connecting, creating the stream and bucket, stream bounds and limits),
//! `history` (following the stream, recovery: reads handed to `deltasync_core::recovery`'s
//! pure verdict) and `store` (snapshots in the bucket).

pub mod connect;
pub mod history;
pub mod status;
pub mod store;

pub use connect::{
    bucket_config, connect, ensure_bucket, ensure_stream, jetstream, position_headroom,
    stream_bounds, stream_bounds_and_limits, stream_config, stream_limits, NatsError,
    BUCKET_HISTORY,
};
