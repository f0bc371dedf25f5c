//! The API's typed errors and the one place they become gRPC statuses (the
//! JSON gateway maps the same [`ErrorKind`] to HTTP statuses).

use weir_protocol::RoomId;
use weir_protocol::coordinator::CoordError;

use crate::config_center::ConfigValueError;
use crate::store::StoreError;

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
    /// The business store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A config value was refused (the message names the key).
    #[error("invalid config: {0}")]
    Config(#[from] ConfigValueError),
    /// A thing the request names does not exist.
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// The thing is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The call needs a valid token of this control plane and got none.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's token does not allow the call.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Grants are switched off on this control plane.
    #[error(
        "grants are disabled on this control plane (they are enabled by `weir dev`, or by `weir control --allow-grants`)"
    )]
    GrantsDisabled,
    /// This control plane runs without a business store.
    #[error("this control plane has no business store (start it with --database or a --data-dir)")]
    NoStore,
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
            Self::InvalidArgument { .. } | Self::Config(_) => ErrorKind::InvalidArgument,
            Self::NoNode { .. } | Self::NoStore => ErrorKind::Unavailable,
            Self::Coordinator(CoordError::Conflict(_)) => ErrorKind::Aborted,
            Self::Coordinator(CoordError::Unsupported(_)) => ErrorKind::Unimplemented,
            Self::Coordinator(_) => ErrorKind::Unavailable,
            Self::MintingDisabled | Self::PermissionDenied(_) | Self::GrantsDisabled => {
                ErrorKind::PermissionDenied
            }
            Self::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Self::Internal(_) => ErrorKind::Internal,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Self::Store(e) => match e {
                StoreError::Invalid { .. } => ErrorKind::InvalidArgument,
                StoreError::NotFound { .. } => ErrorKind::NotFound,
                StoreError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
                StoreError::FailedPrecondition(_) | StoreError::InsufficientFunds { .. } => {
                    ErrorKind::FailedPrecondition
                }
                StoreError::Unavailable(_) => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
        }
    }
}

/// The class of an error: a gRPC code, an HTTP status and a stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Aborted,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Internal,
}

impl ErrorKind {
    /// The stable name used in JSON errors and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::Aborted => "aborted",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::Unavailable => "unavailable",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::Aborted => tonic::Code::Aborted,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Unimplemented => tonic::Code::Unimplemented,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status of the JSON gateway.
    pub fn http_status(self) -> http::StatusCode {
        match self {
            Self::InvalidArgument => http::StatusCode::BAD_REQUEST,
            Self::NotFound => http::StatusCode::NOT_FOUND,
            Self::AlreadyExists | Self::FailedPrecondition | Self::Aborted => {
                http::StatusCode::CONFLICT
            }
            Self::PermissionDenied => http::StatusCode::FORBIDDEN,
            Self::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            Self::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            Self::Unimplemented => http::StatusCode::NOT_IMPLEMENTED,
            Self::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        tonic::Status::new(err.kind().grpc_code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_their_class() {
        let cases = [
            (
                StoreError::invalid("title", "is empty"),
                tonic::Code::InvalidArgument,
            ),
            (
                StoreError::NotFound {
                    what: "room",
                    id: "r".into(),
                },
                tonic::Code::NotFound,
            ),
            (
                StoreError::AlreadyExists {
                    what: "user",
                    id: "u".into(),
                },
                tonic::Code::AlreadyExists,
            ),
            (
                StoreError::FailedPrecondition("ended".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                StoreError::Unavailable("down".into()),
                tonic::Code::Unavailable,
            ),
            (StoreError::Internal("x".into()), tonic::Code::Internal),
            (
                StoreError::InsufficientFunds {
                    user: "fan".into(),
                    balance: 5,
                    needed: 10,
                },
                tonic::Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            let status = tonic::Status::from(ApiError::from(err.clone()));
            assert_eq!(status.code(), code, "{err}");
            assert_eq!(status.message(), err.to_string());
        }
        // The field is named in the message.
        let status = tonic::Status::from(ApiError::from(StoreError::invalid("title", "is empty")));
        assert_eq!(status.message(), "invalid title: is empty");
        let poor = ApiError::from(StoreError::InsufficientFunds {
            user: "fan".into(),
            balance: 5,
            needed: 10,
        });
        assert_eq!(
            poor.to_string(),
            "insufficient funds: fan has 5 and this costs 10"
        );
        assert_eq!(
            ApiError::Unauthenticated("x".into()).kind().http_status(),
            http::StatusCode::UNAUTHORIZED
        );
        let conflict = ApiError::from(CoordError::Conflict("x".into()));
        assert_eq!(conflict.kind(), ErrorKind::Aborted);
    }
}
