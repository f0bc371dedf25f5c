//! The API's typed errors and the one place they become gRPC statuses (the
//! JSON gateway maps the same [`ErrorKind`] to HTTP statuses).

use weir_protocol::RoomId;
use weir_protocol::coordinator::CoordError;

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// A field of the request is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No healthy node can take the client.
    #[error(
        "no media node can take a {role} of room {room} right now (none is healthy with spare capacity); retry shortly"
    )]
    NoNode { room: RoomId, role: &'static str },
    /// The coordinator did not answer and there is no recent view to fall back on.
    #[error("cluster state is unavailable: {0}")]
    Coordinator(#[from] CoordError),
    /// Token minting is switched off on this control plane.
    #[error(
        "token minting is disabled on this control plane (it is enabled by `weir dev`, or by allowing it in the control plane's config)"
    )]
    MintingDisabled,
    /// Something that should not happen; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An invalid-argument error naming the field.
    pub fn invalid(field: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.to_string(),
        }
    }

    /// The class of the error, shared by both transports.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Self::NoNode { .. } | Self::Coordinator(_) => ErrorKind::Unavailable,
            Self::MintingDisabled => ErrorKind::PermissionDenied,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// The class of an error: a gRPC code, an HTTP status and a stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// The stable name used in JSON errors and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::PermissionDenied => "permission_denied",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status of the JSON gateway.
    pub fn http_status(self) -> http::StatusCode {
        match self {
            Self::InvalidArgument => http::StatusCode::BAD_REQUEST,
            Self::NotFound => http::StatusCode::NOT_FOUND,
            Self::PermissionDenied => http::StatusCode::FORBIDDEN,
            Self::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        tonic::Status::new(err.kind().grpc_code(), err.to_string())
    }
}
