//! The media the native peer sends (`--send-media`): a test pattern and a
//! tone, encoded once by Chromium's own encoders (scripts/make-media.mjs)
//! and embedded as IVF files, looped in real time. So the peer needs no
//! codec library (no libvpx or libopus to build), and sends what browsers
//! decode: the pattern plays in their tile, the tone in their speakers.
//!
//! IVF, the simplest container of encoded frames: a 32-byte header
//! (`DKIF`, a fourcc, the frame size, the time base as rate/scale and the
//! frame count), then per frame its length, its time in the time base and
//! its bytes. Parsed here by hand: it is 20 lines, and no crate for it is
//! worth a dependency.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use str0m::format::Codec;
use str0m::media::{Frequency, MediaKind};

/// One encoded frame, and how long it lasts in the codec's RTP clock.
#[derive(Debug, Clone)]
pub struct Frame {
    pub data: Arc<[u8]>,
    pub ticks: u32,
}

/// Encoded frames to send looped, from the first (a key frame).
#[derive(Debug, Clone)]
pub struct Clip {
    pub kind: MediaKind,
    pub codec: Codec,
    /// The RTP clock rate: 90 kHz for video, 48 kHz for Opus.
    pub clock_rate: Frequency,
    pub frames: Vec<Frame>,
    /// For audio, how loud it is (dBov, 0 is full scale): sent with each
    /// frame (RFC 6464), so that browsers show when it "speaks".
    pub level: Option<i8>,
}

impl Clip {
    /// How long `frame` lasts in real time.
    pub fn duration(&self, frame: &Frame) -> Duration {
        Duration::from_secs_f64(f64::from(frame.ticks) / f64::from(self.clock_rate.get()))
    }

    /// How many ticks of the RTP clock `elapsed` lasts.
    pub fn ticks(&self, elapsed: Duration) -> u64 {
        let ticks = elapsed.as_nanos() * u128::from(self.clock_rate.get()) / 1_000_000_000;
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }
}

/// Why bytes are not an IVF file this peer can send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IvfError {
    #[error("not an IVF file (no DKIF header)")]
    NotIvf,
    #[error("the file ends inside {0}")]
    Truncated(&'static str),
    #[error("a zero time base")]
    ZeroTimeBase,
    #[error("no frames")]
    Empty,
    #[error("frame times that do not increase")]
    TimeGoesBack,
    #[error("a frame longer than an RTP clock can count")]
    TooLong,
}

/// An IVF file's frames, each as its time (in seconds, as a fraction
/// `pts * scale / rate`) and its bytes; with its fourcc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivf<'a> {
    pub fourcc: [u8; 4],
    pub rate: u32,
    pub scale: u32,
    pub frames: Vec<(u64, &'a [u8])>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads an IVF file; every length is checked against what is there.
pub fn parse_ivf(bytes: &[u8]) -> Result<Ivf<'_>, IvfError> {
    if bytes.len() < 32 || &bytes[..4] != b"DKIF" {
        return Err(IvfError::NotIvf);
    }
    let header_len = usize::from(u16_at(bytes, 6)).max(32);
    let (rate, scale) = (u32_at(bytes, 16), u32_at(bytes, 20));
    if rate == 0 || scale == 0 {
        return Err(IvfError::ZeroTimeBase);
    }
    let mut rest = bytes
        .get(header_len..)
        .ok_or(IvfError::Truncated("the header"))?;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(IvfError::Truncated("a frame header"));
        }
        let len = u32_at(rest, 0) as usize;
        let pts = u64::from_le_bytes(rest[4..12].try_into().map_err(|_| IvfError::NotIvf)?);
        let data = rest
            .get(12..12 + len)
            .ok_or(IvfError::Truncated("a frame"))?;
        if frames.last().is_some_and(|(last, _)| *last >= pts) {
            return Err(IvfError::TimeGoesBack);
        }
        frames.push((pts, data));
        rest = &rest[12 + len..];
    }
    if frames.is_empty() {
        return Err(IvfError::Empty);
    }
    Ok(Ivf {
        fourcc: [bytes[8], bytes[9], bytes[10], bytes[11]],
        rate,
        scale,
        frames,
    })
}

/// A clip of `kind` and `codec` from an IVF file, its frame times in the
/// RTP clock `clock_rate`. The last frame lasts as long as the one
/// before it (or, alone, one unit of the time base).
pub fn clip_from_ivf(
    ivf: &Ivf<'_>,
    kind: MediaKind,
    codec: Codec,
    clock_rate: Frequency,
) -> Result<Clip, IvfError> {
    let ticks = |pts: u64| -> u128 {
        u128::from(pts) * u128::from(ivf.scale) * u128::from(clock_rate.get())
            / u128::from(ivf.rate)
    };
    let mut frames: Vec<Frame> = Vec::with_capacity(ivf.frames.len());
    for (i, (pts, data)) in ivf.frames.iter().enumerate() {
        let length = match ivf.frames.get(i + 1) {
            Some((next, _)) => ticks(*next) - ticks(*pts),
            None if i > 0 => u128::from(frames[i - 1].ticks),
            None => ticks(1).max(1),
        };
        frames.push(Frame {
            data: Arc::from(*data),
            ticks: u32::try_from(length.max(1)).map_err(|_| IvfError::TooLong)?,
        });
    }
    Ok(Clip {
        kind,
        codec,
        clock_rate,
        frames,
        level: Some(-17),
    })
}

/// The test pattern: 2 s of 320×240 VP8 at 15 frames a second, about
/// 180 kbit/s.
pub fn pattern() -> &'static Clip {
    static CLIP: OnceLock<Clip> = OnceLock::new();
    CLIP.get_or_init(|| {
        embedded(
            include_bytes!("../media/pattern.ivf"),
            MediaKind::Video,
            Codec::Vp8,
            Frequency::NINETY_KHZ,
        )
    })
}

/// The tone: 1 s of 440 Hz in Opus (mono, 20 ms frames), about 32 kbit/s.
pub fn tone() -> &'static Clip {
    static CLIP: OnceLock<Clip> = OnceLock::new();
    CLIP.get_or_init(|| Clip {
        // A sine of amplitude 0.2 (scripts/make-media.mjs): RMS 0.14, -17 dBov.
        level: Some(-17),
        ..embedded(
            include_bytes!("../media/tone.ivf"),
            MediaKind::Audio,
            Codec::Opus,
            Frequency::FORTY_EIGHT_KHZ,
        )
    })
}

fn embedded(bytes: &'static [u8], kind: MediaKind, codec: Codec, clock_rate: Frequency) -> Clip {
    // Files of this crate, checked by the tests below: not input.
    parse_ivf(bytes)
        .and_then(|ivf| clip_from_ivf(&ivf, kind, codec, clock_rate))
        .expect("the embedded media is a valid IVF file")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ivf(fourcc: &[u8; 4], rate: u32, frames: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = b"DKIF".to_vec();
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&32u16.to_le_bytes());
        out.extend_from_slice(fourcc);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for (pts, data) in frames {
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&pts.to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn the_embedded_media_loops_from_a_key_frame_at_its_rate() {
        let video = pattern();
        assert_eq!(video.frames.len(), 30);
        // A VP8 key frame: bit 0 of the first byte clear, then the start code.
        let first = &video.frames[0].data;
        assert_eq!(first[0] & 1, 0);
        assert_eq!(&first[3..6], &[0x9d, 0x01, 0x2a]);
        assert!(
            video.frames.iter().all(|f| f.ticks == 6000),
            "15 frames a second"
        );
        let audio = tone();
        assert!(audio.frames.len() >= 50);
        assert!(audio.frames.iter().all(|f| f.ticks == 960), "20 ms frames");
        assert_eq!(audio.duration(&audio.frames[0]), Duration::from_millis(20));
    }

    #[test]
    fn frame_times_follow_the_time_base_and_the_last_lasts_as_the_one_before() {
        let bytes = ivf(b"VP80", 30, &[(0, b"a"), (1, b"bb"), (3, b"c")]);
        let parsed = parse_ivf(&bytes).unwrap();
        assert_eq!(parsed.fourcc, *b"VP80");
        let clip =
            clip_from_ivf(&parsed, MediaKind::Video, Codec::Vp8, Frequency::NINETY_KHZ).unwrap();
        let ticks: Vec<u32> = clip.frames.iter().map(|f| f.ticks).collect();
        assert_eq!(ticks, [3000, 6000, 6000]);
        assert_eq!(&*clip.frames[1].data, b"bb");
    }

    #[test]
    fn broken_files_are_refused_with_what_is_wrong() {
        let good = ivf(b"OPUS", 48_000, &[(0, b"x"), (960, b"y")]);
        assert_eq!(parse_ivf(b"RIFF"), Err(IvfError::NotIvf));
        assert_eq!(
            parse_ivf(&good[..good.len() - 1]),
            Err(IvfError::Truncated("a frame"))
        );
        assert_eq!(
            parse_ivf(&good[..40]),
            Err(IvfError::Truncated("a frame header"))
        );
        assert_eq!(parse_ivf(&good[..32]), Err(IvfError::Empty));
        assert_eq!(
            parse_ivf(&ivf(b"OPUS", 48_000, &[(5, b"x"), (5, b"y")])),
            Err(IvfError::TimeGoesBack)
        );
        assert_eq!(
            parse_ivf(&ivf(b"OPUS", 0, &[(0, b"x")])),
            Err(IvfError::ZeroTimeBase)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), dkif: bool) {
            if dkif && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(b"DKIF");
            }
            if let Ok(parsed) = parse_ivf(&bytes) {
                let _ = clip_from_ivf(&parsed, MediaKind::Audio, Codec::Opus, Frequency::FORTY_EIGHT_KHZ);
            }
        }

        #[test]
        fn written_files_read_back(frames in proptest::collection::vec((1u64..1000, proptest::collection::vec(any::<u8>(), 0..50)), 1..20), rate in 1u32..100_000) {
            let mut pts = 0;
            let frames: Vec<(u64, Vec<u8>)> = frames.into_iter().map(|(step, data)| { pts += step; (pts, data) }).collect();
            let borrowed: Vec<(u64, &[u8])> = frames.iter().map(|(p, d)| (*p, d.as_slice())).collect();
            let bytes = ivf(b"VP80", rate, &borrowed);
            let parsed = parse_ivf(&bytes).unwrap();
            prop_assert_eq!(parsed.frames, borrowed);
        }
    }
}
