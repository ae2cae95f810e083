//! Parsing and building whole STUN messages.

use std::net::SocketAddr;

use ring::hmac;

use super::attr::{self, encode_address, encode_xor_address};
use super::{Class, HEADER_LEN, MAGIC_COOKIE, message_type, split_type};

/// XORed into the CRC-32 of a message to make FINGERPRINT (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Why bytes are not a valid STUN message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message (bad leading bits or magic cookie)")]
    NotStun,
    #[error("message shorter than its header says ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("message length {0} is not a multiple of 4")]
    Unaligned(usize),
    #[error("datagram has {0} bytes after the message")]
    Trailing(usize),
    #[error("attribute 0x{0:04x} runs past the end of the message")]
    AttrOverrun(u16),
    #[error("malformed attribute 0x{0:04x}")]
    BadAttr(u16),
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
    #[error("FINGERPRINT does not match the message")]
    BadFingerprint,
}

/// One attribute as found in a message: its type and value (no padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttr<'a> {
    pub typ: u16,
    pub value: &'a [u8],
}

/// A parsed STUN message borrowing the bytes it came from.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    method: u16,
    class: Class,
    tid: [u8; 12],
    /// End of the attributes covered by integrity: where the first
    /// MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 or FINGERPRINT starts.
    covered_end: usize,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: bool,
}

impl<'a> Message<'a> {
    /// Parses exactly one message: `buf` must hold the message and nothing
    /// else. A FINGERPRINT, if present, is verified here.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, StunError> {
        if !super::is_stun(buf) {
            return Err(StunError::NotStun);
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len % 4 != 0 {
            return Err(StunError::Unaligned(len));
        }
        let need = HEADER_LEN + len;
        if buf.len() < need {
            return Err(StunError::Truncated {
                have: buf.len(),
                need,
            });
        }
        if buf.len() > need {
            return Err(StunError::Trailing(buf.len() - need));
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&buf[8..20]);
        let mut msg = Message {
            raw: buf,
            method,
            class,
            tid,
            covered_end: need,
            integrity: None,
            integrity_sha256: None,
            fingerprint: false,
        };
        let mut pos = HEADER_LEN;
        while pos < need {
            if msg.fingerprint {
                return Err(StunError::AfterFingerprint);
            }
            if need - pos < 4 {
                return Err(StunError::AttrOverrun(0));
            }
            let typ = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let vlen = usize::from(u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]));
            let next = pos + 4 + vlen.next_multiple_of(4);
            if next > need {
                return Err(StunError::AttrOverrun(typ));
            }
            let first_protected =
                msg.integrity.is_none() && msg.integrity_sha256.is_none() && !msg.fingerprint;
            match typ {
                attr::MESSAGE_INTEGRITY if first_protected => {
                    if vlen != 20 {
                        return Err(StunError::BadAttr(typ));
                    }
                    msg.integrity = Some(pos);
                    msg.covered_end = pos;
                }
                attr::MESSAGE_INTEGRITY_SHA256
                    if msg.integrity_sha256.is_none() && !msg.fingerprint =>
                {
                    if !(16..=32).contains(&vlen) || vlen % 4 != 0 {
                        return Err(StunError::BadAttr(typ));
                    }
                    msg.integrity_sha256 = Some(pos);
                    if first_protected {
                        msg.covered_end = pos;
                    }
                }
                attr::FINGERPRINT => {
                    if vlen != 4 || next != need {
                        return Err(StunError::BadAttr(typ));
                    }
                    let expected = u32::from_be_bytes([
                        buf[pos + 4],
                        buf[pos + 5],
                        buf[pos + 6],
                        buf[pos + 7],
                    ]);
                    if crc32fast::hash(&buf[..pos]) ^ FINGERPRINT_XOR != expected {
                        return Err(StunError::BadFingerprint);
                    }
                    msg.fingerprint = true;
                    if first_protected {
                        msg.covered_end = pos;
                    }
                }
                _ => {}
            }
            pos = next;
        }
        Ok(msg)
    }

    pub fn method(&self) -> u16 {
        self.method
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn transaction_id(&self) -> &[u8; 12] {
        &self.tid
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some() || self.integrity_sha256.is_some()
    }

    /// The attributes that precede any integrity or fingerprint attribute
    /// (those after MESSAGE-INTEGRITY must be ignored, RFC 8489 §14.5).
    pub fn attrs(&self) -> AttrIter<'a> {
        AttrIter {
            buf: &self.raw[..self.covered_end],
            pos: HEADER_LEN,
        }
    }

    /// The first attribute of type `typ`, if any.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// Comprehension-required attribute types this crate does not know.
    pub fn unknown_required(&self, known: impl Fn(u16) -> bool) -> Vec<u16> {
        let mut unknown: Vec<u16> = self
            .attrs()
            .map(|a| a.typ)
            .filter(|&t| t < 0x8000 && !known(t))
            .collect();
        unknown.dedup();
        unknown
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY,
    /// with the long-term or short-term key. `false` also when there is none.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if let Some(pos) = self.integrity_sha256 {
            return self.verify_at(pos, hmac::HMAC_SHA256, key);
        }
        match self.integrity {
            Some(pos) => self.verify_at(pos, hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key),
            None => false,
        }
    }

    fn verify_at(&self, pos: usize, algorithm: hmac::Algorithm, key: &[u8]) -> bool {
        let vlen = usize::from(u16::from_be_bytes([self.raw[pos + 2], self.raw[pos + 3]]));
        let expected = &self.raw[pos + 4..pos + 4 + vlen];
        let tag = integrity_tag(
            &self.raw[..pos],
            pos - HEADER_LEN + 4 + vlen,
            algorithm,
            key,
        );
        // Truncated SHA-256 tags compare their prefix (RFC 8489 §14.6).
        ct_eq(&tag.as_ref()[..vlen], expected)
    }
}

/// HMAC over `prefix` (header + attributes before the integrity attribute),
/// with the header's length field set to `len` as the RFC requires.
fn integrity_tag(prefix: &[u8], len: usize, algorithm: hmac::Algorithm, key: &[u8]) -> hmac::Tag {
    let key = hmac::Key::new(algorithm, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(&prefix[..2]);
    ctx.update(&(len as u16).to_be_bytes());
    ctx.update(&prefix[4..]);
    ctx.sign()
}

/// Compares in time that depends only on the length, so that a forger
/// learns nothing from how fast a wrong tag is refused.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Iterates over a message's attributes.
pub struct AttrIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = RawAttr<'a>;

    fn next(&mut self) -> Option<RawAttr<'a>> {
        // Bounds were checked by `Message::parse`; stay defensive anyway.
        let header = self.buf.get(self.pos..self.pos + 4)?;
        let typ = u16::from_be_bytes([header[0], header[1]]);
        let vlen = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let value = self.buf.get(self.pos + 4..self.pos + 4 + vlen)?;
        self.pos += 4 + vlen.next_multiple_of(4);
        Some(RawAttr { typ, value })
    }
}

/// Writes a STUN message attribute by attribute.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    pad: u8,
}

impl MessageBuilder {
    pub fn new(method: u16, class: Class, tid: &[u8; 12]) -> Self {
        Self::with_buffer(Vec::with_capacity(128), method, class, tid)
    }

    /// Reuses `buf` (cleared first) to avoid an allocation.
    pub fn with_buffer(mut buf: Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        MessageBuilder { buf, pad: 0 }
    }

    /// Pads attributes with `byte` instead of zeros. Any value is valid
    /// (RFC 8489 §14); the RFC 5769 test vectors use spaces.
    pub fn padding_byte(&mut self, byte: u8) -> &mut Self {
        self.pad = byte;
        self
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute with its padding. Values longer than 65,535
    /// bytes cannot be encoded and are truncated.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(usize::from(u16::MAX))];
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = value.len().next_multiple_of(4) - value.len();
        self.buf.extend_from_slice(&[self.pad; 3][..pad]);
        self.set_len();
        self
    }

    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let tid: [u8; 12] = self.buf[8..20].try_into().unwrap_or([0; 12]);
        let (bytes, len) = encode_xor_address(addr, &tid);
        self.attr(typ, &bytes[..len])
    }

    pub fn address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let (bytes, len) = encode_address(addr);
        self.attr(typ, &bytes[..len])
    }

    /// ERROR-CODE with a reason phrase.
    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12): why the relayed address of
    /// `family` (`attr::FAMILY_IPV4` or `FAMILY_IPV6`) was not allocated.
    /// ERROR-CODE's layout, with the family in its first byte.
    pub fn address_error(&mut self, family: u8, code: u16, reason: &str) -> &mut Self {
        self.address_error_as(attr::ADDRESS_ERROR_CODE, family, code, reason)
    }

    /// ADDRESS-ERROR-CODE under the attribute type `kind`: the RFC's, or
    /// the draft's (`attr::ADDRESS_ERROR_CODE_DRAFT`) for a client that
    /// asked in the draft's numbering.
    pub fn address_error_as(
        &mut self,
        kind: u16,
        family: u8,
        code: u16,
        reason: &str,
    ) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[family, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(kind, &v)
    }

    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let len = self.buf.len() - HEADER_LEN + 24;
        let tag = integrity_tag(&self.buf, len, hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
        self.attr(attr::MESSAGE_INTEGRITY, tag.as_ref())
    }

    /// MESSAGE-INTEGRITY-SHA256 (full 32-byte tag).
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let len = self.buf.len() - HEADER_LEN + 36;
        let tag = integrity_tag(&self.buf, len, hmac::HMAC_SHA256, key);
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, tag.as_ref())
    }

    /// FINGERPRINT; must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        let len = (self.buf.len() - HEADER_LEN + 8) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf) ^ FINGERPRINT_XOR;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// The fixed part of a Data indication (header, XOR-PEER-ADDRESS, DATA
/// header) for `payload_len` bytes, so a driver can write it in front of a
/// payload already in its buffer. Returns the bytes and how many are used;
/// the payload must be followed by `padding(payload_len)` zero bytes.
pub fn data_indication_prefix(
    peer: SocketAddr,
    payload_len: usize,
    tid: &[u8; 12],
) -> ([u8; 48], usize) {
    let (addr, alen) = encode_xor_address(peer, tid);
    let total_attrs = 4 + alen + 4 + payload_len.next_multiple_of(4);
    let mut out = [0u8; 48];
    out[0..2].copy_from_slice(&message_type(super::method::DATA, Class::Indication).to_be_bytes());
    out[2..4].copy_from_slice(&(total_attrs as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(tid);
    out[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
    out[24..24 + alen].copy_from_slice(&addr[..alen]);
    let p = 24 + alen;
    out[p..p + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    out[p + 2..p + 4].copy_from_slice(&(payload_len as u16).to_be_bytes());
    (out, p + 4)
}

/// Zero bytes needed after `len` bytes to reach a multiple of 4.
pub fn padding(len: usize) -> usize {
    len.next_multiple_of(4) - len
}
