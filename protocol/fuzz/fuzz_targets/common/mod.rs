//! What the fuzz targets share: decoding every frame of a byte stream with
//! a [`FrameCodec`], whole, and checking the codec's error discipline.

use bytes::BytesMut;
use tether_protocol::{FrameCodec, FrameError};
use tokio_util::codec::Decoder;

/// Decodes every complete frame of `stream` as `In`, stopping at the first
/// error; decoding may only fail with a decoding error (never `Io` or
/// `Unencodable`), and its message must render.
pub fn decode_all<In, Out>(stream: &[u8], max_frame_len: usize) -> Vec<In>
where
    In: serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut codec = FrameCodec::<In, Out>::new(max_frame_len);
    let mut buf = BytesMut::from(stream);
    let mut messages = Vec::new();
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(message)) => {
                // Debug of every message renders (it redacts secrets by hand).
                let _ = format!("{message:?}");
                messages.push(message);
            }
            Ok(None) => return messages,
            Err(err) => {
                assert!(
                    !matches!(err, FrameError::Io(_) | FrameError::Unencodable(_)),
                    "decoding produced {err:?}"
                );
                let _ = err.to_string();
                return messages;
            }
        }
    }
}
