//! The bearer-token check: every endpoint requires `Authorization: Bearer <api.token>` when
//! a token is configured.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, HttpError};

/// Middleware: 401 `{"error"}` for a missing or wrong token.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = state.api.token.as_deref() {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match given {
            None => {
                return HttpError::Unauthorized(
                    "missing bearer token: send Authorization: Bearer <api.token>".into(),
                )
                .into_response()
            }
            Some(g) if !constant_time_eq(g.trim().as_bytes(), token.as_bytes()) => {
                return HttpError::Unauthorized("wrong bearer token".into()).into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares the SHA-256 digests of both in constant time (`subtle`): the time taken
/// tells neither how much of a guess matched nor whether its length was right (comparing
/// the bytes themselves would have to stop or branch on a length mismatch).
pub fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    use subtle::ConstantTimeEq;
    let g = digest(&SHA256, given);
    let t = digest(&SHA256, token);
    g.as_ref().ct_eq(t.as_ref()).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(constant_time_eq(b"", b""));
    }
}
