//! Property tests of the upstream client's parsers, run with every test run (256 cases each;
//! `PROPTEST_CASES=100000 cargo nextest run upstream::fuzz` for a longer campaign). A failing
//! case is kept in `proptest-regressions/gateway/upstream_fuzz.txt` and replayed first.

use proptest::{collection::vec, prelude::*};

use super::*;

/// Decodes a chunked body fed in reads of `split` bytes: the data and how many bytes followed
/// it, or `Ok(None)` while incomplete.
pub(super) fn decode(wire: &[u8], split: usize) -> Result<Option<(Vec<u8>, usize)>, &'static str> {
    let mut decoder = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in wire.chunks(split.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.step(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::NeedMore => break,
                Step::End => return Ok(Some((out, buf.len()))),
            }
        }
    }
    Ok(None)
}

/// RFC 9112 `chunk-size = 1*HEXDIG`, with the optional whitespace the decoder allows.
fn is_chunk_size(s: &str) -> bool {
    let digits = s.trim_matches([' ', '\t']);
    !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_hexdigit())
}

/// RFC 9110 `Content-Length = 1*DIGIT` that fits the counter.
fn content_length(s: &str) -> Option<u64> {
    let digits = s.trim_matches([' ', '\t']);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Field lines that say nothing about framing or the connection.
fn plain_fields() -> impl Strategy<Value = Vec<(String, String)>> {
    vec(("x-[a-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..12)
}

proptest! {
    #[test]
    fn any_bytes_give_the_head_parser_an_answer_not_a_panic(
        wire in vec(any::<u8>(), 0..1024),
        prefix in prop_oneof![Just(&b""[..]), Just(&b"HTTP/1.1 200 OK\r\n"[..]), Just(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])],
        is_head in any::<bool>(),
    ) {
        let mut buf = BytesMut::from(prefix);
        buf.extend_from_slice(&wire);
        let before = buf.len();
        if let Ok(Some(head)) = parse_head(&mut buf, is_head) {
            prop_assert!(!head.status.is_informational());
            prop_assert!(buf.len() < before, "a head was parsed out of no bytes");
        }
    }

    #[test]
    fn a_head_is_incomplete_at_every_cut_and_whole_at_its_end(
        code in 200u16..600,
        fields in plain_fields(),
        framing in prop_oneof![Just(None), (0u64..1 << 40).prop_map(Some)],
        chunked in any::<bool>(),
        interim in any::<bool>(),
        rest in vec(any::<u8>(), 0..64),
    ) {
        let mut head = String::new();
        if interim {
            head.push_str("HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n");
        }
        head.push_str(&format!("HTTP/1.1 {code} Whatever\r\n"));
        for (name, value) in &fields {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(n) = framing {
            head.push_str(&format!("content-length: {n}\r\n"));
        }
        if chunked {
            head.push_str("transfer-encoding: gzip, chunked\r\n");
        }
        head.push_str("\r\n");
        for cut in 0..head.len() {
            let mut buf = BytesMut::from(&head.as_bytes()[..cut]);
            prop_assert!(parse_head(&mut buf, false).unwrap().is_none(), "complete at {} of {}", cut, head.len());
        }
        let mut buf = BytesMut::from(head.as_bytes());
        buf.extend_from_slice(&rest);
        let parsed = parse_head(&mut buf, false).unwrap().unwrap();
        prop_assert_eq!(parsed.status.as_u16(), code);
        prop_assert_eq!(&buf[..], &rest[..], "the body's bytes stay in the buffer");
        let expected = if code == 204 || code == 304 {
            ResponseFraming::Empty
        } else if chunked {
            ResponseFraming::Chunked
        } else if let Some(n) = framing {
            ResponseFraming::Length(n)
        } else {
            ResponseFraming::UntilClose
        };
        prop_assert_eq!(parsed.framing, expected);
        for (name, value) in &fields {
            let got: Vec<&[u8]> = parsed.headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
            prop_assert!(got.contains(&value.as_bytes()), "{} lost", name);
        }
    }

    #[test]
    fn content_length_is_digits_only(value in "[ \t0-9+a-f\u{a0}\u{85}-]{0,22}") {
        let wire = format!("HTTP/1.1 200 OK\r\ncontent-length:{value}\r\n\r\n");
        let got = parse_head(&mut BytesMut::from(wire.as_bytes()), false);
        match content_length(&value) {
            Some(n) => prop_assert_eq!(got.unwrap().unwrap().framing, ResponseFraming::Length(n)),
            None => prop_assert_eq!(got.unwrap_err(), "invalid Content-Length"),
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_sizes_and_read_boundaries(
        chunks in vec(vec(any::<u8>(), 1..300), 0..8),
        upper in any::<bool>(),
        zeros in 0usize..3,
        extension in prop_oneof![Just(""), Just(";a=b"), Just(" ;q=\"x\"")],
        trailers in vec("x-[a-z]{1,8}: [a-z0-9]{0,8}", 0..3),
        split in 1usize..64,
        rest in vec(any::<u8>(), 0..16),
    ) {
        let mut wire = Vec::new();
        for chunk in &chunks {
            let size = if upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
            wire.extend_from_slice(format!("{}{size}{extension}\r\n", "0".repeat(zeros)).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(format!("0{extension}\r\n").as_bytes());
        for t in &trailers {
            wire.extend_from_slice(format!("{t}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        let body_len = wire.len();
        wire.extend_from_slice(&rest);
        let (body, left) = decode(&wire, split).unwrap().expect("a whole body decodes to its end");
        prop_assert_eq!(body, chunks.concat());
        // Whatever followed the body (the next response) is not taken.
        prop_assert!(left <= rest.len() && body_len + left <= wire.len());
    }

    #[test]
    fn chunk_sizes_are_hex_digits_only(size in "[ 0-9a-fA-F+x-]{0,18}") {
        let mut buf = BytesMut::from(format!("{size}\r\n").as_bytes());
        let got = Chunked::Size.step(&mut buf);
        if is_chunk_size(&size) {
            prop_assert!(got.is_ok(), "{:?} refused", size);
        } else {
            prop_assert_eq!(got.unwrap_err(), "invalid chunk size");
        }
    }

    #[test]
    fn any_bytes_give_the_chunk_decoder_an_answer_not_a_panic(
        wire in vec(any::<u8>(), 0..2048),
        split in 1usize..128,
    ) {
        if let Ok(Some((body, _))) = decode(&wire, split) {
            prop_assert!(body.len() < wire.len());
        }
    }
}
