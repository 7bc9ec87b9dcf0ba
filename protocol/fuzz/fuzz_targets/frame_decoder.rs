//! Feeds arbitrary bytes to both directions of `FrameCodec`, whole and in
//! chunks, with the default and a tiny frame limit. Decoding must never
//! panic, must only fail with decoding errors (never `Io`/`Unencodable`),
//! must end cleanly only on an empty buffer, and must not depend on how the
//! bytes were split into reads.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether_protocol::{AgentMessage, ControlMessage, FrameCodec, FrameError, MAX_FRAME_LEN};
use tokio_util::codec::Decoder;

/// One observable decoding step, compared as text.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Message(String),
    Error(String),
    End,
}

fn check(err: &FrameError) {
    assert!(
        !matches!(err, FrameError::Io(_) | FrameError::Unencodable(_)),
        "decoding produced {err:?}"
    );
    let _ = err.to_string();
}

fn run<In: serde::de::DeserializeOwned + std::fmt::Debug, Out>(
    mut codec: FrameCodec<In, Out>,
    bytes: &[u8],
    chunk: usize,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut buf = BytesMut::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.put_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(message)) => outcomes.push(Outcome::Message(format!("{message:?}"))),
                Ok(None) => break,
                Err(err) => {
                    check(&err);
                    outcomes.push(Outcome::Error(format!("{err:?}")));
                    return outcomes;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(message)) => outcomes.push(Outcome::Message(format!("{message:?}"))),
            Ok(None) => {
                assert!(
                    buf.is_empty(),
                    "clean end with {} bytes buffered",
                    buf.len()
                );
                outcomes.push(Outcome::End);
                return outcomes;
            }
            Err(err) => {
                check(&err);
                outcomes.push(Outcome::Error(format!("{err:?}")));
                return outcomes;
            }
        }
    }
}

/// Number of frames when `stream` is exactly a sequence of complete
/// length-prefixed frames, `None` when it ends inside one.
fn complete_frames(stream: &[u8]) -> Option<usize> {
    let (mut at, mut frames) = (0usize, 0usize);
    while at < stream.len() {
        let prefix: [u8; 4] = stream.get(at..at + 4)?.try_into().ok()?;
        at = at.checked_add(4 + u32::from_be_bytes(prefix) as usize)?;
        frames += 1;
    }
    (at == stream.len()).then_some(frames)
}

/// A clean end is only reported after exactly the stream's frames.
fn check_end(stream: &[u8], outcomes: &[Outcome]) {
    if outcomes.last() == Some(&Outcome::End) {
        assert_eq!(
            complete_frames(stream),
            Some(outcomes.len() - 1),
            "clean end inside a frame"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size; the rest is the stream.
    let (chunk, stream) = match data.split_first() {
        Some((first, rest)) => (usize::from(*first % 32) + 1, rest),
        None => (1, data),
    };
    for max in [MAX_FRAME_LEN, 64] {
        let whole = run(
            FrameCodec::<AgentMessage, ControlMessage>::new(max),
            stream,
            usize::MAX,
        );
        let split = run(
            FrameCodec::<AgentMessage, ControlMessage>::new(max),
            stream,
            chunk,
        );
        assert_eq!(whole, split, "control-plane side, max {max}, chunk {chunk}");
        check_end(stream, &whole);
        let whole = run(
            FrameCodec::<ControlMessage, AgentMessage>::new(max),
            stream,
            usize::MAX,
        );
        let split = run(
            FrameCodec::<ControlMessage, AgentMessage>::new(max),
            stream,
            chunk,
        );
        assert_eq!(whole, split, "agent side, max {max}, chunk {chunk}");
        check_end(stream, &whole);
    }
});
