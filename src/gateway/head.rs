//! The request head the gateway writes for an upstream, as HTTP/1.1 bytes. A leaf: the header
//! rewrite (`headers`) writes into it and the client (`upstream`) frames and sends it, and
//! neither knows the other.

use bytes::BytesMut;
use http::Method;

/// A request head for the upstream, written as HTTP/1.1 while the proxy decides what it holds:
/// no header map is edited and encoded afterwards.
#[derive(Debug)]
pub(super) struct RequestHead {
    /// The request line and the field lines written so far.
    pub(super) buf: BytesMut,
    /// A HEAD request: its response has no body whatever it says.
    pub(super) is_head: bool,
    /// The method may be sent twice (see [`idempotent`]).
    pub(super) idempotent: bool,
    /// A POST-like method, or the client said `Content-Length`: an empty body still says so.
    pub(super) says_length: bool,
}

impl RequestHead {
    /// Starts `METHOD target HTTP/1.1`; the target (origin form) comes in pieces written back to
    /// back, so a base path and a rewritten query need no string of their own.
    pub(super) fn new(method: &Method, target: &[&str]) -> Self {
        let mut buf = BytesMut::with_capacity(512);
        buf.extend_from_slice(method.as_str().as_bytes());
        buf.extend_from_slice(b" ");
        for piece in target {
            buf.extend_from_slice(piece.as_bytes());
        }
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        Self {
            buf,
            is_head: *method == Method::HEAD,
            idempotent: idempotent(method),
            says_length: matches!(*method, Method::POST | Method::PUT | Method::PATCH),
        }
    }

    /// Adds a field line. `Content-Length` and `Transfer-Encoding` are not written: the framing
    /// is the gateway's own, since the client's may not match the body it sends.
    pub(super) fn field(&mut self, name: &str, value: &[u8]) {
        if name == "content-length" {
            self.says_length = true;
            return;
        }
        if name == "transfer-encoding" {
            return;
        }
        self.field_list(name, [value], b"");
    }

    /// Adds one field line for a list of values, separated by `sep`; nothing when there is none.
    pub(super) fn field_list<'v>(
        &mut self,
        name: &str,
        values: impl IntoIterator<Item = &'v [u8]>,
        sep: &[u8],
    ) {
        let mut values = values.into_iter();
        let Some(first) = values.next() else {
            return;
        };
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(first);
        for value in values {
            self.buf.extend_from_slice(sep);
            self.buf.extend_from_slice(value);
        }
        self.buf.extend_from_slice(b"\r\n");
    }

    #[cfg(test)]
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Methods whose request can be sent again when a reused connection closes before any answer
/// (RFC 9110 §9.2.2).
pub(super) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
