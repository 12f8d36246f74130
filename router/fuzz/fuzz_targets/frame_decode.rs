//! Feeds arbitrary bytes to the link frame decoder, split into arbitrary reads: it must never
//! panic, and every frame it accepts must re-encode to the bytes it consumed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use router::link::frame::{self, Frame};

fuzz_target!(|input: &[u8]| {
    // The first byte chooses how the stream is cut into reads, as a peer's TCP segments would.
    let Some((&cut, data)) = input.split_first() else { return };
    let step = usize::from(cut).max(1);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match frame::decode(&mut buf) {
                Ok(Some(frame)) => {
                    let consumed = before.len() - buf.len();
                    let mut again = BytesMut::new();
                    frame.encode(&mut again);
                    assert_eq!(&again[..], &before[..consumed], "re-encoding {frame:?} differs");
                    assert_eq!(again.len(), Frame::encoded_len(&frame));
                }
                Ok(None) => break,
                // A link closes on the first error; so does this stream.
                Err(_) => return,
            }
        }
    }
});
