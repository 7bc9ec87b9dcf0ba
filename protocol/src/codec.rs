//! Framing: a `u32` big-endian length prefix followed by a postcard body.
//!
//! [`FrameCodec`] wraps [`tokio_util::codec::LengthDelimitedCodec`] with a
//! maximum frame length (1 MiB unless told otherwise) and postcard
//! (de)serialisation. Every way a frame can be wrong is a [`FrameError`]
//! variant; decoding never panics, whatever the bytes.

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Default maximum size of one frame body: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of the length prefix in front of every frame body.
const LENGTH_PREFIX_LEN: usize = 4;

/// Why a frame could not be read or written. Each error ends the stream it
/// happened on, never the connection or the process.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more than the maximum frame length.
    #[error("frame exceeds the {max}-byte limit")]
    Oversized { max: usize },
    /// The stream ended in the middle of a frame. `buffered` counts the bytes
    /// of the incomplete frame that were received, length prefix included.
    #[error("stream ended inside a frame ({buffered} bytes left unread)")]
    Truncated { buffered: usize },
    /// The body names an enum variant this build does not know (a newer peer,
    /// or garbage).
    #[error("frame names a message variant this version does not know")]
    UnknownVariant,
    /// The body is not a valid postcard encoding of the expected message.
    #[error("frame body is not a valid message: {0}")]
    Undecodable(postcard::Error),
    /// The body decoded, but bytes were left over after the message.
    #[error("frame body has {0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The message could not be serialised.
    #[error("message could not be encoded: {0}")]
    Unencodable(postcard::Error),
    /// The underlying stream failed.
    #[error("stream i/o failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes frames carrying `In` and encodes frames carrying `Out`.
///
/// An agent uses `FrameCodec<ControlMessage, AgentMessage>`, a control plane
/// `FrameCodec<AgentMessage, ControlMessage>`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    max_frame_len: usize,
    /// True once the inner codec has consumed a length prefix and is waiting
    /// for the body: the buffer may then be empty while a frame is open.
    in_body: bool,
    /// Sum of the bodies of the frames decoded so far.
    decoded_bytes: u64,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl<In, Out> Clone for FrameCodec<In, Out> {
    fn clone(&self) -> Self {
        Self::new(self.max_frame_len)
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .max_frame_length(max_frame_len)
            .new_codec();
        Self {
            inner,
            max_frame_len,
            in_body: false,
            decoded_bytes: 0,
            _types: PhantomData,
        }
    }

    /// The largest frame body this codec accepts.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Bytes of frame bodies decoded so far (length prefixes not counted).
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded_bytes
    }

    fn map_io(&self, err: std::io::Error) -> FrameError {
        let oversized = err
            .get_ref()
            .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>());
        if oversized {
            FrameError::Oversized {
                max: self.max_frame_len,
            }
        } else {
            FrameError::Io(err)
        }
    }
}

/// Decodes one postcard body, refusing unknown variants and trailing bytes.
///
/// postcard 1.x never returns its `DeserializeBadEnum` error: an enum
/// discriminant past the last variant is refused by serde's derived variant
/// visitor through `de::Error::invalid_value`, which postcard reports as
/// `SerdeDeCustom`. The message types of this crate derive `Deserialize` and
/// have no hand-written impls, so for them `SerdeDeCustom` means exactly
/// "unknown variant". Keep it that way (or revisit this mapping) when adding
/// fields with custom deserialisers.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(FrameError::TrailingBytes(rest.len())),
        Err(postcard::Error::DeserializeBadEnum | postcard::Error::SerdeDeCustom) => {
            Err(FrameError::UnknownVariant)
        }
        Err(err) => Err(FrameError::Undecodable(err)),
    }
}

/// Encodes one message as a complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(message: &T, max_frame_len: usize) -> Result<Bytes, FrameError> {
    let mut codec = FrameCodec::<(), T>::new(max_frame_len);
    let mut buf = BytesMut::new();
    codec.encode(message, &mut buf)?;
    Ok(buf.freeze())
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        let before = src.len();
        match self.inner.decode(src) {
            Ok(Some(body)) => {
                self.in_body = false;
                self.decoded_bytes += body.len() as u64;
                decode_body(&body).map(Some)
            }
            Ok(None) => {
                // The inner codec consumes the length prefix as soon as it
                // has it, then waits for the body.
                if src.len() != before {
                    self.in_body = true;
                }
                Ok(None)
            }
            Err(err) => Err(self.map_io(err)),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() && !self.in_body => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len() + if self.in_body { LENGTH_PREFIX_LEN } else { 0 },
            }),
        }
    }
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, message: &Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = postcard::to_stdvec(message).map_err(FrameError::Unencodable)?;
        self.inner
            .encode(Bytes::from(body), dst)
            .map_err(|err| self.map_io(err))
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, message: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        <Self as Encoder<&Out>>::encode(self, &message, dst)
    }
}
