//! When a request may go to another backend, and how long it may take: idempotent methods,
//! the retriable status codes (502, 503, 504; gRPC `UNAVAILABLE`), and the client's
//! `grpc-timeout` deadline.

use std::time::Duration;

use hyper::{HeaderMap, Method, StatusCode};

/// RFC 9110's idempotent methods: repeating them is safe even once the backend saw them.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Responses that ask for another backend (Envoy's `retriable-status-codes` default set, the
/// ones GEP-1731 requires), and gRPC's `UNAVAILABLE` in a trailers-only response.
pub fn retriable(status: StatusCode, headers: &HeaderMap) -> bool {
    matches!(status.as_u16(), 502..=504) || grpc_status(headers) == Some(14)
}

/// `grpc-status` in a header block (a trailers-only response carries it in the headers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `grpc-timeout` (`1..=8 digits` then a unit: H, M, S, m, u, n), as gRPC's HTTP/2 protocol
/// defines it. A malformed value is ignored, as gRPC servers do.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, v.parse().unwrap());
        h
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let t = |v| grpc_timeout(&headers("grpc-timeout", v));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("S"), None);
        assert_eq!(t("123456789S"), None, "nine digits is too many");
        assert_eq!(t("10x"), None);
    }

    #[test]
    fn retriable_statuses() {
        let none = HeaderMap::new();
        assert!(retriable(StatusCode::BAD_GATEWAY, &none));
        assert!(retriable(StatusCode::GATEWAY_TIMEOUT, &none));
        assert!(!retriable(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(retriable(StatusCode::OK, &headers("grpc-status", "14")));
        assert!(!retriable(StatusCode::OK, &headers("grpc-status", "0")));
        assert!(idempotent(&Method::PUT) && !idempotent(&Method::POST));
    }
}
