//! An answer of known length up to `coupa.response_buffer`, read whole
//! before its headers go to the client: its pieces, then its trailers.

use std::collections::VecDeque;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

use super::{next_frame, End};
use crate::proxy::upstream::ResponseBody;
use crate::BoxError;

/// An answer read whole: its pieces, then its trailers, if any.
pub struct Held {
    /// Most answers come in one piece: no allocation for it.
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
    trailers: Option<Box<HeaderMap>>,
    pub(super) remaining: u64,
}

impl Held {
    /// The whole answer, or why it broke off.
    pub(super) async fn read_whole(mut body: ResponseBody, size: u64) -> Result<Held, BoxError> {
        let mut held = Held {
            first: None,
            rest: VecDeque::new(),
            trailers: None,
            remaining: size,
        };
        loop {
            match next_frame(&mut body).await {
                Ok(data) if held.first.is_none() => held.first = Some(data),
                Ok(data) => held.rest.push_back(data),
                Err(End::Complete(trailers)) => {
                    held.trailers = trailers;
                    return Ok(held);
                }
                Err(End::Failed(error)) => return Err(error),
            }
        }
    }

    pub(super) fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if let Some(data) = self.first.take().or_else(|| self.rest.pop_front()) {
            self.remaining = self.remaining.saturating_sub(data.len() as u64);
            return Some(Ok(Frame::data(data)));
        }
        self.trailers.take().map(|t| Ok(Frame::trailers(*t)))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_go_out_in_order_then_the_trailers_and_the_length_counts_down() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut held = Held {
            first: Some(Bytes::from_static(b"hello ")),
            rest: VecDeque::from([Bytes::from_static(b"wide "), Bytes::from_static(b"world")]),
            trailers: Some(Box::new(trailers)),
            remaining: 16,
        };
        let mut data = Vec::new();
        while let Some(frame) = held.next_frame() {
            let frame = frame.unwrap();
            if let Some(chunk) = frame.data_ref() {
                data.extend_from_slice(chunk);
                continue;
            }
            assert_eq!(held.remaining, 0, "the length is spent before the trailers");
            assert_eq!(frame.trailers_ref().unwrap()["x-checksum"], "abc");
        }
        assert_eq!(data, b"hello wide world");
        assert!(held.is_empty());
        assert!(held.next_frame().is_none());
    }
}
