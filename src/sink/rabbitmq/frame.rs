//! The one limit of a message that only the broker connection knows: its
//! content header (the properties, headers included) must fit in a single
//! frame of the negotiated `frame_max`. A larger one makes RabbitMQ close
//! the whole connection with FRAME_ERROR, so it is checked before anything
//! is published, and such a message is a bad row.

use lapin::BasicProperties;
use lapin::protocol::basic::gen_properties;

/// Frame type, channel and size (7) plus the frame-end octet (1).
const FRAME_OVERHEAD: u64 = 8;
/// Class id, weight and body size in front of the properties.
const HEADER_PREFIX: u64 = 2 + 2 + 8;

/// The size in bytes of the content header frame for these properties,
/// as lapin will write it (`None` if they cannot be encoded at all).
pub fn header_frame_len(properties: &BasicProperties) -> Option<u64> {
    // The generator writes into a Vec; `From` builds its write context.
    let written = gen_properties(properties)(From::from(Vec::new())).ok()?;
    Some(FRAME_OVERHEAD + HEADER_PREFIX + written.position)
}

/// Why a message cannot be sent within `frame_max`, or `None` if it can.
/// `frame_max` 0 means the broker set no limit.
pub fn too_large(properties: &BasicProperties, frame_max: u32) -> Option<String> {
    match header_frame_len(properties) {
        None => Some("its properties cannot be encoded as AMQP".to_owned()),
        Some(len) if frame_max != 0 && len > u64::from(frame_max) => Some(format!(
            "its header frame (properties and headers) is {len} bytes; the broker's frame_max is {frame_max} (make the row's headers smaller)"
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    fn with_header(len: usize) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            "k".into(),
            AMQPValue::LongString(LongString::from(vec![b'v'; len])),
        );
        BasicProperties::default()
            .with_message_id("id-1".into())
            .with_headers(headers)
    }

    #[test]
    fn measures_the_header_frame_as_written() {
        // 2 flag bytes, message_id (1 + 4), headers table (4 + 1 + 1 + 1 + 4 + 10).
        let len = header_frame_len(&with_header(10)).unwrap();
        assert_eq!(len, 8 + 12 + 2 + 5 + 4 + 3 + 4 + 10);
        // Grows byte for byte with the header value.
        assert_eq!(header_frame_len(&with_header(110)).unwrap(), len + 100);
    }

    #[test]
    fn a_header_over_frame_max_is_refused_and_one_under_it_is_not() {
        let small = with_header(1000);
        assert_eq!(too_large(&small, 131_072), None);
        let big = with_header(1_000_000);
        let why = too_large(&big, 131_072).expect("too large");
        assert!(why.contains("frame_max is 131072"), "{why}");
        // No limit negotiated: anything goes.
        assert_eq!(too_large(&big, 0), None);
    }
}
