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

/// Compares without an early exit, so the time taken does not tell how much of a guess
/// matched (the length still shows, which a random token of fixed length makes harmless).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    }
}
