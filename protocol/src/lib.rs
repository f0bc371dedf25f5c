//! Weir's wire contracts, shared by every plane: the gRPC API (generated from
//! `proto/`), validated ids, the signed token format, the SRT streamid grammar, the relay frame format between nodes, and the `Coordinator`
//! and room bus traits that both planes talk to (implementations live in the planes).

pub mod bus;
pub mod chat;
pub mod coordinator;
pub mod events;
pub mod ids;
pub mod relay;
pub mod stats;
pub mod streamid;
pub mod token;

/// Generated protobuf and tonic code for `weir.v1` (feature `grpc`).
#[cfg(feature = "grpc")]
#[allow(clippy::all, missing_docs, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("weir.v1");

    /// The encoded `FileDescriptorSet` of `weir.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/weir_descriptor.bin"));
}

pub use ids::{IdError, NodeId, RoomId, SessionId};
pub use streamid::{StreamId, StreamIdError, StreamMode};
pub use token::{Mode, TokenClaims, TokenError, TokenSigner, TokenVerifier};
