//! The STUN message codec (RFC 8489), plus TURN's ChannelData framing.
//!
//! [`Message::parse`] checks the header and walks the attributes once,
//! without copying; attribute values are slices of the input.
//! [`MessageBuilder`] writes a message into a `Vec<u8>`, computing lengths,
//! padding, MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT.

pub mod attr;
mod message;

pub use attr::*;
pub(crate) use message::ct_eq;
pub use message::{
    AttrIter, Message, MessageBuilder, RawAttr, StunError, data_indication_prefix, padding,
};

/// The magic cookie every RFC 5389+ message carries.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the fixed STUN header.
pub const HEADER_LEN: usize = 20;

/// STUN/TURN methods.
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// The four message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// Interleaves a 12-bit method and a class into the 14-bit message type.
pub fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// Splits a message type into method and class.
pub fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 1) | ((t >> 7) & 2);
    (method, Class::from_bits(class))
}

/// Whether a datagram looks like STUN (first two bits zero, magic cookie).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf[0] & 0xC0 == 0
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
}

/// ChannelData (RFC 8656 §12.4): 2-byte channel number, 2-byte length,
/// then the data.
pub const CHANNEL_MIN: u16 = 0x4000;
/// RFC 8656 narrowed channel numbers to 0x4000..=0x4FFF, but RFC 5766
/// allowed up to 0x7FFF and deployed clients (coturn's among them) still use
/// that range, so the server accepts it. Our own client stays below
/// [`CHANNEL_MAX_RFC8656`].
pub const CHANNEL_MAX: u16 = 0x7FFF;
pub const CHANNEL_MAX_RFC8656: u16 = 0x4FFF;

/// A parsed ChannelData message: the channel and the payload's byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData {
    pub channel: u16,
    pub len: usize,
}

impl ChannelData {
    /// Parses the 4-byte header; the payload is `buf[4..4 + len]`. Over
    /// UDP the datagram may carry padding past the payload.
    pub fn parse(buf: &[u8]) -> Option<ChannelData> {
        if buf.len() < 4 {
            return None;
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        (buf.len() >= 4 + len).then_some(ChannelData { channel, len })
    }

    /// Writes the 4-byte header for `len` bytes of payload.
    pub fn header(channel: u16, len: u16) -> [u8; 4] {
        let c = channel.to_be_bytes();
        let l = len.to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }
}

/// How many bytes a message starting at `buf` occupies on a stream
/// transport (TCP/TLS), once enough of it is there to tell: STUN messages
/// are 20 + length; ChannelData is 4 + length, padded to 4 (RFC 8656 §12.5).
/// `None` means "need more bytes"; `Err` means the stream is not STUN/TURN.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, StunError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let first = buf[0];
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if first & 0xC0 == 0 {
        Ok(Some(HEADER_LEN + len))
    } else if first & 0xC0 == 0x40 {
        Ok(Some((4 + len).next_multiple_of(4)))
    } else {
        Err(StunError::NotStun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_interleaving() {
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::BINDING, Class::Error), 0x0111);
        assert_eq!(message_type(method::ALLOCATE, Class::Request), 0x0003);
        assert_eq!(message_type(method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
        for m in 0..0x1000u16 {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
    }

    #[test]
    fn channel_data() {
        let mut buf = ChannelData::header(0x4001, 3).to_vec();
        buf.extend_from_slice(b"abc\0");
        assert_eq!(
            ChannelData::parse(&buf),
            Some(ChannelData {
                channel: 0x4001,
                len: 3
            })
        );
        assert_eq!(ChannelData::parse(&buf[..5]), None);
        assert_eq!(ChannelData::parse(&[0x80, 0, 0, 0]), None);
        assert_eq!(stream_frame_len(&buf), Ok(Some(8)));
        assert_eq!(stream_frame_len(&[0x80, 0, 0, 0]), Err(StunError::NotStun));
    }
}
