//! The protocol's gRPC codec: prost's, with 1 KiB buffers instead of tonic's
//! 8 KiB. Each agent session holds one encode and one decode buffer on each
//! side for as long as it is connected, and most messages (heartbeats, acks,
//! statuses) are a few dozen bytes: at 10,000 agents the default costs the hub
//! about 6 KiB more per connection. Larger messages grow the buffer as needed.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
pub const BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a stream yields to the runtime (tonic's default).
pub const YIELD_BYTES: usize = 32 * 1024;

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
