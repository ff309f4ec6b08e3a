//! The pure half of the guard: follows a request stream's framing byte by
//! byte (heads with `httparse`, bodies by length or chunk size lines),
//! flags a head with both `Content-Length` and `Transfer-Encoding`, and
//! says which heads the guard must change before hyper reads them: a
//! target to percent-encode ([`super::target`]), or a malformed head to
//! replace by a stand-in the server answers with its reason.

use std::ops::Range;

use super::{target, ConnectionGuard, Refusal};

/// What became of a head the parser refused.
enum Reparsed {
    /// Refused only for its target's latin-1 bytes: with those encoded it
    /// parses; `sent_len` is its length as sent.
    Head {
        target: Range<usize>,
        sent_len: usize,
        framing: Phase,
    },
    /// As above, but not whole yet.
    Partial,
    /// Malformed: refused with its reason (recorded in `verdicts`).
    Refused,
    /// Hyper's own answer is the right one (431 for too many headers).
    LeftToHyper,
}

/// A head `httparse` refused with `error`: parsed again with a latin-1
/// target encoded, or refused with the reason hyper's bare 400 would not
/// give (rare: off the common path).
#[cold]
fn reparse_malformed(
    error: httparse::Error,
    rest: &[u8],
    max_head: usize,
    heads_seen: &mut u64,
    verdicts: &ConnectionGuard,
) -> Reparsed {
    let reparsed = match error {
        httparse::Error::Token => target::with_target_encoded(rest),
        _ => None,
    };
    let refusal = match reparsed {
        Some((target, copy)) => {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&copy) {
                Ok(httparse::Status::Complete(len)) => {
                    let index = *heads_seen;
                    *heads_seen += 1;
                    return Reparsed::Head {
                        target,
                        // The head as sent is shorter than the copy.
                        sent_len: len - (copy.len() - rest.len()),
                        framing: framing_of(request.headers, index, verdicts),
                    };
                }
                Ok(httparse::Status::Partial) if rest.len() <= max_head => {
                    return Reparsed::Partial
                }
                Ok(httparse::Status::Partial) => return Reparsed::LeftToHyper,
                Err(error) => Refusal::of_malformed(error),
            }
        }
        None => Refusal::of_malformed(error),
    };
    let Some(refusal) = refusal else {
        return Reparsed::LeftToHyper;
    };
    verdicts.refuse(*heads_seen, refusal);
    *heads_seen += 1;
    Reparsed::Refused
}

/// Whether `rest` starts as HTTP/2's preface does (or is a start of it).
fn could_be_h2_preface(rest: &[u8]) -> bool {
    let n = rest.len().min(H2_PREFACE_LINE.len());
    rest[..n] == H2_PREFACE_LINE[..n]
}

/// Where in the request stream the guard is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Expecting a request head.
    Head,
    /// Inside a body of known length.
    Length(u64),
    /// Inside a chunked body.
    Chunk(Chunk),
    /// Not inspecting (HTTP/2, or something hyper will reject anyway).
    Passthrough,
    /// A malformed head was refused: nothing after it is read.
    Refused,
}

/// A change the guard makes to the bytes of one scan before hyper reads
/// them; ranges index the scanned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Edit {
    /// A request target with bytes hyper's URI type refuses.
    EncodeTarget(Range<usize>),
    /// A malformed head, from its first byte to the end of the data:
    /// replaced by [`STAND_IN`], the connection read no further.
    Refuse(usize),
}

/// What hyper reads in place of a refused head: a request it parses, which
/// the server answers with the refusal (and closes) before any phase runs.
pub(super) const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// HTTP/2's preface starts like a request line; hyper tells it apart.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// In a chunk-size line; `size` so far, `in_extension` after `;`.
    Size {
        size: u64,
        digits: u8,
        in_extension: bool,
    },
    /// Size line read up to its CR.
    SizeLf {
        size: u64,
    },
    Data(u64),
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer {
        line_len: u64,
        saw_cr: bool,
    },
}

const MAX_HEADERS: usize = 128;

/// Scans `data` from `phase`, returning how many bytes it is done with:
/// all of them, unless `data` ends inside a request head. What must change
/// in those bytes is pushed to `edits`, in order.
pub(super) fn scan(
    data: &[u8],
    phase: &mut Phase,
    max_head: usize,
    heads_seen: &mut u64,
    verdicts: &ConnectionGuard,
    edits: &mut Vec<Edit>,
) -> usize {
    let mut pos = 0;
    while pos < data.len() {
        match *phase {
            Phase::Passthrough | Phase::Refused => return data.len(),
            Phase::Head => {
                let rest = &data[pos..];
                // hyper ignores empty lines before a request line.
                if rest.starts_with(b"\r\n") {
                    pos += 2;
                    continue;
                }
                if rest == b"\r" {
                    return pos;
                }
                // Left uninitialised, as hyper does: filling 128 empty
                // headers cost more than parsing a typical head.
                let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
                    MAX_HEADERS];
                let mut request = httparse::Request::new(&mut []);
                match request.parse_with_uninit_headers(rest, &mut headers) {
                    Ok(httparse::Status::Complete(len)) => {
                        let index = *heads_seen;
                        *heads_seen += 1;
                        if let Some(path) = request.path {
                            if target::needs_encoding(path.as_bytes()) {
                                // The path is a slice of `rest`.
                                let start = pos + (path.as_ptr() as usize - rest.as_ptr() as usize);
                                edits.push(Edit::EncodeTarget(start..start + path.len()));
                            }
                        }
                        *phase = framing_of(request.headers, index, verdicts);
                        pos += len;
                    }
                    Ok(httparse::Status::Partial) if rest.len() <= max_head => return pos,
                    Err(error) if !could_be_h2_preface(rest) => {
                        match reparse_malformed(error, rest, max_head, heads_seen, verdicts) {
                            Reparsed::Head {
                                target,
                                sent_len,
                                framing,
                            } => {
                                edits
                                    .push(Edit::EncodeTarget(pos + target.start..pos + target.end));
                                *phase = framing;
                                pos += sent_len;
                            }
                            Reparsed::Partial => return pos,
                            Reparsed::Refused => {
                                edits.push(Edit::Refuse(pos));
                                *phase = Phase::Refused;
                            }
                            Reparsed::LeftToHyper => *phase = Phase::Passthrough,
                        }
                    }
                    // HTTP/2's preface, too many headers, too large: hyper
                    // decides.
                    _ => *phase = Phase::Passthrough,
                }
            }
            Phase::Length(remaining) => {
                let take = remaining.min((data.len() - pos) as u64);
                pos += take as usize;
                *phase = if remaining == take {
                    Phase::Head
                } else {
                    Phase::Length(remaining - take)
                };
            }
            Phase::Chunk(Chunk::Data(remaining)) => {
                let take = remaining.min((data.len() - pos) as u64);
                pos += take as usize;
                *phase = Phase::Chunk(if remaining == take {
                    Chunk::DataCr
                } else {
                    Chunk::Data(remaining - take)
                });
            }
            Phase::Chunk(chunk) => {
                *phase = step_chunk(chunk, data[pos]);
                pos += 1;
            }
        }
    }
    pos
}

/// How the body after a head is framed, as hyper reads it; flags a head
/// with both `Content-Length` and `Transfer-Encoding`.
fn framing_of(headers: &[httparse::Header<'_>], index: u64, verdicts: &ConnectionGuard) -> Phase {
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (parsed, length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(prior)) if v == prior => {}
                // Unparsable or conflicting: hyper answers 400.
                _ => return Phase::Passthrough,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked_last = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    match (transfer_encoding, length) {
        (true, Some(_)) => {
            verdicts.refuse(index, Refusal::AmbiguousFraming);
            // hyper closes the connection after this request.
            Phase::Passthrough
        }
        (true, None) if chunked_last => Phase::Chunk(Chunk::Size {
            size: 0,
            digits: 0,
            in_extension: false,
        }),
        (true, None) => Phase::Passthrough,
        (false, Some(0)) | (false, None) => Phase::Head,
        (false, Some(n)) => Phase::Length(n),
    }
}

fn step_chunk(chunk: Chunk, byte: u8) -> Phase {
    let next = match chunk {
        Chunk::Size {
            size,
            digits,
            in_extension,
        } => match byte {
            b'\r' => Chunk::SizeLf { size },
            _ if in_extension => chunk,
            b';' | b' ' | b'\t' => Chunk::Size {
                size,
                digits,
                in_extension: true,
            },
            _ => match (byte as char).to_digit(16) {
                // 16 hex digits overflow u64: hyper refuses those too.
                Some(d) if digits < 15 => Chunk::Size {
                    size: size * 16 + u64::from(d),
                    digits: digits + 1,
                    in_extension,
                },
                _ => return Phase::Passthrough,
            },
        },
        Chunk::SizeLf { size } => match byte {
            b'\n' if size == 0 => Chunk::Trailer {
                line_len: 0,
                saw_cr: false,
            },
            b'\n' => Chunk::Data(size),
            _ => return Phase::Passthrough,
        },
        Chunk::DataCr => match byte {
            b'\r' => Chunk::DataLf,
            _ => return Phase::Passthrough,
        },
        Chunk::DataLf => match byte {
            b'\n' => Chunk::Size {
                size: 0,
                digits: 0,
                in_extension: false,
            },
            _ => return Phase::Passthrough,
        },
        Chunk::Trailer { line_len, saw_cr } => match byte {
            b'\r' => Chunk::Trailer {
                line_len,
                saw_cr: true,
            },
            b'\n' if saw_cr && line_len == 0 => return Phase::Head,
            b'\n' => Chunk::Trailer {
                line_len: 0,
                saw_cr: false,
            },
            _ => Chunk::Trailer {
                line_len: line_len + 1,
                saw_cr: false,
            },
        },
        Chunk::Data(_) => chunk,
    };
    Phase::Chunk(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Feeds `stream` in pieces of `step` bytes, holding back what the
    /// scan does not release, as the guard does; returns the index of the
    /// first ambiguous request, if any, and the final phase.
    fn run(stream: &[u8], step: usize) -> (Option<u64>, Phase) {
        let (refused, phase, _) = run_with_edits(stream, step);
        (refused, phase)
    }

    /// [`run`], also returning the edits with ranges into `stream`.
    fn run_with_edits(stream: &[u8], step: usize) -> (Option<u64>, Phase, Vec<Edit>) {
        let verdicts = ConnectionGuard::default();
        let (mut phase, mut heads) = (Phase::Head, 0);
        let mut pending: Vec<u8> = Vec::new();
        let mut offset = 0;
        let mut all = Vec::new();
        for piece in stream.chunks(step) {
            pending.extend_from_slice(piece);
            let mut edits = Vec::new();
            let released = scan(
                &pending,
                &mut phase,
                64 * 1024,
                &mut heads,
                &verdicts,
                &mut edits,
            );
            all.extend(edits.into_iter().map(|edit| match edit {
                Edit::EncodeTarget(r) => Edit::EncodeTarget(r.start + offset..r.end + offset),
                Edit::Refuse(at) => Edit::Refuse(at + offset),
            }));
            pending.drain(..released);
            offset += released;
        }
        let first = verdicts.refused_from.load(Ordering::Acquire);
        ((first != u64::MAX).then_some(first), phase, all)
    }

    #[test]
    fn pipelined_requests_are_followed_through_bodies_in_any_split() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
            POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (flagged, _) = run(stream, step);
            assert_eq!(flagged, Some(3), "step {step}");
        }
    }

    #[test]
    fn unambiguous_streams_are_not_flagged() {
        let stream = b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd\
            GET /c HTTP/1.1\r\n\r\n";
        let (flagged, phase) = run(stream, 5);
        assert_eq!(flagged, None);
        assert_eq!(phase, Phase::Head);
    }

    #[test]
    fn smuggled_head_hidden_in_a_body_is_not_taken_for_a_head() {
        // The body of a well-framed request looks like a request with both
        // fields; it is body data, not a head.
        let inner = b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            inner.len()
        )
        .into_bytes();
        stream.extend_from_slice(inner);
        let (flagged, phase) = run(&stream, 3);
        assert_eq!(flagged, None);
        assert_eq!(phase, Phase::Head);
    }

    #[test]
    fn http2_preface_and_too_many_headers_switch_to_passthrough() {
        let (_, phase) = run(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 4);
        assert_eq!(phase, Phase::Passthrough);
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let (refused, phase) = run(many.as_bytes(), 64);
        assert_eq!((refused, phase), (None, Phase::Passthrough));
    }

    #[test]
    fn a_malformed_head_is_refused_where_it_starts_in_any_split() {
        let stream =
            b"GET /ok HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nBad Header\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        for step in [1, 5, stream.len()] {
            let (refused, phase, edits) = run_with_edits(stream, step);
            assert_eq!(refused, Some(1), "step {step}");
            assert_eq!(phase, Phase::Refused);
            assert_eq!(edits, [Edit::Refuse(20)], "step {step}");
        }
        let verdicts = ConnectionGuard::default();
        let (mut phase, mut heads, mut edits) = (Phase::Head, 0, Vec::new());
        scan(
            b"GET /a\x01b HTTP/1.1\r\n\r\n",
            &mut phase,
            1024,
            &mut heads,
            &verdicts,
            &mut edits,
        );
        assert_eq!(verdicts.refused_from.load(Ordering::Acquire), 0);
        assert!(matches!(
            verdicts.refusal(),
            Some((Refusal::MalformedRequestLine, _))
        ));
    }

    #[test]
    fn a_latin1_target_is_parsed_again_encoded_and_its_body_followed() {
        let stream =
            b"POST /M\xfcller HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET /x HTTP/1.1\r\n\r\n";
        for step in [1, 3, stream.len()] {
            let (refused, phase, edits) = run_with_edits(stream, step);
            assert_eq!((refused, phase), (None, Phase::Head), "step {step}");
            assert_eq!(edits, [Edit::EncodeTarget(5..12)], "step {step}");
        }
    }

    #[test]
    fn targets_hyper_refuses_are_marked_for_encoding_in_pipelined_heads() {
        let stream = b"GET /a?f=[\"id\"] HTTP/1.1\r\n\r\nGET /plain HTTP/1.1\r\n\r\nGET /b<c> HTTP/1.1\r\n\r\n";
        for step in [1, 7, stream.len()] {
            let (refused, phase, edits) = run_with_edits(stream, step);
            assert_eq!((refused, phase), (None, Phase::Head));
            let targets: Vec<&[u8]> = edits
                .iter()
                .map(|edit| match edit {
                    Edit::EncodeTarget(r) => &stream[r.clone()],
                    Edit::Refuse(_) => panic!("{edit:?}"),
                })
                .collect();
            assert_eq!(
                targets,
                [b"/a?f=[\"id\"]".as_slice(), b"/b<c>"],
                "step {step}"
            );
        }
    }
}
