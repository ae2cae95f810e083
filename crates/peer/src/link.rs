//! One WebRTC connection to one other peer in the room, sans-IO.
//!
//! A [`Link`] wraps a str0m [`Rtc`] and speaks the web app's conventions
//! (docs/protocol.md): it takes the other peer's signals and the datagrams
//! and time the driver hands it, and leaves behind what to send (signals,
//! datagrams), what happened (connected, a chat message, …) and when to
//! wake it. It owns no socket and reads no clock, so it is tested by
//! connecting two of them in memory.
//!
//! Like the web app, the side that offers first negotiates audio, video,
//! a second video and a second audio (microphone, camera, screen, the
//! screen's sound), all `sendrecv`, and opens the chat channel in that
//! first offer. It receives and counts what the other side sends; with
//! [`Link::send_media`] it also sends the embedded test pattern and tone
//! ([`crate::clip`]) as its camera and microphone, in real time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcError};

use crate::chat::{CHAT_LABEL, CHAT_PROTOCOL, ChannelMessage, ChatError};
use crate::clip::{self, Clip, Frame};
use crate::files::{self, FILE_LABEL, Incoming, MAX_INCOMING, OFFER_TIMEOUT, Offer, Step};
use crate::signals::{SdpKind, Signal};

/// Chat messages held for a chat channel that is not open yet, at most
/// (as the web app holds).
pub const MAX_CHAT_QUEUE: usize = 100;

/// What a link has to tell its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// ICE and DTLS are up.
    Connected,
    /// ICE lost the other side (it may come back).
    Disconnected,
    /// The chat channel is open: messages go at once from now on.
    ChatOpen,
    /// A message on the chat channel.
    Message(ChannelMessage),
    /// Something on the chat channel that is not a message of ours.
    BadMessage(ChatError),
    /// A file offered to us, on its own channel: accept it
    /// ([`Link::accept_file`]) or decline it ([`Link::decline_file`]).
    FileOffered { channel: ChannelId, offer: Offer },
    /// Bytes of a file we accepted, in order.
    FileData { channel: ChannelId, data: Vec<u8> },
    /// All of a file came: keep it, then say so ([`Link::file_kept`]).
    FileEnded { channel: ChannelId },
    /// A file offered stopped coming: the sender cancelled or left, or
    /// sent something out of turn (`why`).
    FileStopped { channel: ChannelId, why: String },
    /// The other side closed the connection.
    Closed,
}

/// Media received over a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaCounts {
    pub audio_frames: u64,
    pub video_frames: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for MediaCounts {
    fn add_assign(&mut self, other: MediaCounts) {
        self.audio_frames += other.audio_frames;
        self.video_frames += other.video_frames;
        self.bytes += other.bytes;
    }
}

/// Why a link failed or refused something.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("WebRTC: {0}")]
    Rtc(#[from] RtcError),
    #[error("an unreadable session description: {0}")]
    Sdp(String),
    #[error("an unreadable ICE candidate: {0}")]
    Candidate(String),
    #[error("a local address str0m cannot use: {0}")]
    LocalAddress(SocketAddr),
    #[error("{MAX_CHAT_QUEUE} chat messages already wait for the channel to open")]
    ChatQueueFull,
}

/// Frames this far behind are skipped rather than sent in a burst (the
/// process was stalled).
const MAX_LAG: Duration = Duration::from_millis(500);

/// A clip sent on one media section, looped, each frame at its time.
struct Playout {
    clip: &'static Clip,
    /// The section: the first of the clip's kind (the camera's or the
    /// microphone's, by the web app's conventions), once negotiated.
    mid: Option<Mid>,
    next: usize,
    /// When the next frame is due: from the connection's start on.
    due: Option<Instant>,
    /// The next frame's RTP time, in the clip's clock.
    rtp: u64,
    /// Frames sent.
    sent: u64,
}

impl Playout {
    /// Hands each frame due by `now` to `write`, with its send time and
    /// RTP time, in order. More than [`MAX_LAG`] behind (the process was
    /// stalled), it skips ahead rather than bursting: the RTP time moves on
    /// with the wall clock, so receivers see a pause, as after any
    /// sender's stall, not frames squeezed together. No frame is dropped,
    /// so the video stays decodable.
    fn take_due(&mut self, now: Instant, mut write: impl FnMut(&Frame, Instant, MediaTime)) {
        let Some(mut due) = self.due else {
            return;
        };
        let lag = now.saturating_duration_since(due);
        if lag > MAX_LAG {
            self.rtp = self.rtp.saturating_add(self.clip.ticks(lag));
            due = now;
        }
        while due <= now {
            let frame = &self.clip.frames[self.next];
            write(frame, due, MediaTime::new(self.rtp, self.clip.clock_rate));
            self.rtp += u64::from(frame.ticks);
            due += self.clip.duration(frame);
            self.next = (self.next + 1) % self.clip.frames.len();
        }
        self.due = Some(due);
    }
}

/// A connection to one peer.
pub struct Link {
    rtc: Rtc,
    polite: bool,
    /// Our offer, until its answer comes, and its text for a `resend`.
    pending: Option<(SdpPendingOffer, String)>,
    chat: Option<ChannelId>,
    chat_queue: VecDeque<String>,
    /// Whether the chat channel is open now.
    chat_open: bool,
    signals: VecDeque<Value>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<LinkEvent>,
    timeout: Instant,
    media: MediaCounts,
    connected: bool,
    playouts: Vec<Playout>,
    /// Files offered to us, by their channels.
    files: HashMap<ChannelId, Incoming>,
    /// The latest time the driver gave.
    now: Instant,
}

impl Link {
    /// A link that reaches the other side from these local candidates
    /// (host, relayed). `polite`: whether we give way when offers cross
    /// (the greater id is).
    pub fn new(candidates: Vec<Candidate>, polite: bool, now: Instant) -> Result<Link, LinkError> {
        let mut rtc = Rtc::builder().build(now);
        for candidate in candidates {
            rtc.add_local_candidate(candidate);
        }
        let mut link = Link {
            rtc,
            polite,
            pending: None,
            chat: None,
            chat_queue: VecDeque::new(),
            chat_open: false,
            signals: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            timeout: now,
            media: MediaCounts::default(),
            connected: false,
            playouts: Vec::new(),
            files: HashMap::new(),
            now,
        };
        link.drive()?;
        Ok(link)
    }

    /// Sends the test pattern as our camera and the tone as our microphone,
    /// from when the connection is up (call before the first offer or
    /// answer). Where the other side does not receive (it watches us not,
    /// or we watch), nothing goes.
    pub fn send_media(&mut self) {
        self.playouts = [clip::pattern(), clip::tone()]
            .into_iter()
            .map(|clip| Playout {
                clip,
                mid: None,
                next: 0,
                due: None,
                rtp: 0,
                sent: 0,
            })
            .collect();
    }

    /// Frames sent so far: video, then audio.
    pub fn frames_sent(&self) -> (u64, u64) {
        let of = |kind| {
            self.playouts
                .iter()
                .filter(|p| p.clip.kind == kind)
                .map(|p| p.sent)
                .sum()
        };
        (of(MediaKind::Video), of(MediaKind::Audio))
    }

    /// Makes the first offer, as a newcomer does to everyone in the room.
    pub fn offer(&mut self) -> Result<(), LinkError> {
        let mut api = self.rtc.sdp_api();
        // The microphone's and the camera's come first (str0m reports no
        // MediaAdded for sections it offers itself).
        let mic = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let camera = api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let chat = api.add_channel_with_config(ChannelConfig {
            label: CHAT_LABEL.into(),
            protocol: CHAT_PROTOCOL.into(),
            ..Default::default()
        });
        if let Some((offer, pending)) = api.apply() {
            self.chat = Some(chat);
            self.send_offer(offer, pending);
            for playout in &mut self.playouts {
                playout.mid = Some(match playout.clip.kind {
                    MediaKind::Audio => mic,
                    MediaKind::Video => camera,
                });
            }
        }
        self.drive()
    }

    fn send_offer(&mut self, offer: SdpOffer, pending: SdpPendingOffer) {
        let sdp = offer.to_sdp_string();
        self.signals.push_back(
            Signal::Description {
                kind: SdpKind::Offer,
                sdp: sdp.clone(),
            }
            .encode(),
        );
        self.pending = Some((pending, sdp));
    }

    /// Takes a signal from the other side. An error leaves the link as it
    /// was: the signal is dropped.
    pub fn handle_signal(&mut self, signal: Signal) -> Result<(), LinkError> {
        match signal {
            Signal::Description {
                kind: SdpKind::Offer,
                sdp,
            } => {
                if self.pending.is_some() {
                    // Offers crossed: the impolite side keeps its own.
                    if !self.polite {
                        tracing::debug!("ignoring a crossing offer (we are impolite)");
                        return Ok(());
                    }
                    self.pending = None;
                    self.chat = None;
                    self.chat_open = false;
                }
                let offer =
                    SdpOffer::from_sdp_string(&sdp).map_err(|e| LinkError::Sdp(e.to_string()))?;
                let answer = self.rtc.sdp_api().accept_offer(offer)?;
                self.signals.push_back(
                    Signal::Description {
                        kind: SdpKind::Answer,
                        sdp: answer.to_sdp_string(),
                    }
                    .encode(),
                );
            }
            Signal::Description {
                kind: SdpKind::Answer,
                sdp,
            } => {
                let Some((pending, offer)) = self.pending.take() else {
                    tracing::debug!("ignoring an answer to no offer of ours");
                    return Ok(());
                };
                let answer = match SdpAnswer::from_sdp_string(&sdp) {
                    Ok(answer) => answer,
                    Err(e) => {
                        self.pending = Some((pending, offer));
                        return Err(LinkError::Sdp(e.to_string()));
                    }
                };
                self.rtc.sdp_api().accept_answer(pending, answer)?;
            }
            Signal::Candidate(Some(line)) => {
                let candidate = Candidate::from_sdp_string(&line)
                    .map_err(|e| LinkError::Candidate(e.to_string()))?;
                self.rtc.add_remote_candidate(candidate);
            }
            Signal::Candidate(None) | Signal::State { .. } => {}
            Signal::Restart => {
                // Only the impolite side restarts ICE (docs/protocol.md).
                if self.polite || self.pending.is_some() {
                    return Ok(());
                }
                let mut api = self.rtc.sdp_api();
                api.ice_restart(true);
                if let Some((offer, pending)) = api.apply() {
                    self.send_offer(offer, pending);
                }
            }
            Signal::Resend => {
                if let Some((_, sdp)) = &self.pending {
                    let sdp = sdp.clone();
                    self.signals.push_back(
                        Signal::Description {
                            kind: SdpKind::Offer,
                            sdp,
                        }
                        .encode(),
                    );
                }
            }
        }
        self.drive()
    }

    /// Takes a datagram if it belongs to this link; false if it does not.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) -> Result<bool, LinkError> {
        let Ok(receive) = Receive::new(Protocol::Udp, source, destination, contents) else {
            return Ok(false);
        };
        self.now = self.now.max(now);
        let input = Input::Receive(now, receive);
        if !self.rtc.accepts(&input) {
            return Ok(false);
        }
        self.rtc.handle_input(input)?;
        self.drive()?;
        Ok(true)
    }

    /// Lets time pass; call at [`Link::timeout`] or later.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        self.now = self.now.max(now);
        let silent: Vec<ChannelId> = self
            .files
            .iter()
            .filter(|(_, f)| f.deadline().is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for channel in silent {
            tracing::warn!("closing a file channel that made no offer within {OFFER_TIMEOUT:?}");
            self.close_file(channel);
        }
        let played = self.play(now);
        if now < self.timeout && !played {
            return Ok(());
        }
        // Frames written go out through str0m's pacer, which runs on time.
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drive()
    }

    /// Writes the frames due by `now`; whether any went to str0m.
    fn play(&mut self, now: Instant) -> bool {
        let mut wrote = false;
        for playout in &mut self.playouts {
            let Some(mid) = playout.mid else {
                continue;
            };
            let sending = self
                .rtc
                .media(mid)
                .is_some_and(|m| m.direction().is_sending());
            let (codec, level) = (playout.clip.codec, playout.clip.level);
            let mut sent = 0;
            playout.take_due(now, |frame, due, rtp_time| {
                if !sending {
                    return;
                }
                let Some(mut writer) = self.rtc.writer(mid) else {
                    return;
                };
                let pt = writer
                    .payload_params()
                    .find(|p| p.spec().codec == codec)
                    .map(|p| p.pt());
                let Some(pt) = pt else {
                    tracing::debug!(%mid, ?codec, "the other side takes no such codec");
                    return;
                };
                if let Some(level) = level {
                    writer = writer.audio_level(level, true);
                }
                match writer.write(pt, due, rtp_time, frame.data.clone()) {
                    Ok(()) => sent += 1,
                    Err(e) => tracing::debug!(%mid, "a frame was not sent: {e}"),
                }
            });
            playout.sent += sent;
            wrote |= sent > 0;
        }
        wrote
    }

    /// Sends a message on the chat channel, now or once it opens.
    pub fn send(&mut self, message: &ChannelMessage) -> Result<(), LinkError> {
        let text = message.encode();
        if self.chat_queue.is_empty() && self.write_chat(&text)? {
            return self.drive();
        }
        if self.chat_queue.len() >= MAX_CHAT_QUEUE {
            return Err(LinkError::ChatQueueFull);
        }
        self.chat_queue.push_back(text);
        Ok(())
    }

    /// Whether the text went out on an open chat channel.
    fn write_chat(&mut self, text: &str) -> Result<bool, LinkError> {
        let Some(id) = self.chat else {
            return Ok(false);
        };
        match self.rtc.channel(id) {
            Some(mut channel) => Ok(channel.write(false, text.as_bytes())?),
            None => Ok(false),
        }
    }

    /// Closes the connection.
    pub fn close(&mut self) {
        self.rtc.disconnect();
    }

    /// Drains str0m's output until it asks to be woken: the single
    /// mutation, then drain, that str0m's API requires.
    fn drive(&mut self) -> Result<(), LinkError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(at) => {
                    self.timeout = at;
                    return Ok(());
                }
                Output::Transmit(transmit) => self.transmits.push_back(transmit),
                Output::Event(event) => self.on_event(event)?,
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), LinkError> {
        match event {
            Event::Connected => {
                self.connected = true;
                self.events.push_back(LinkEvent::Connected);
                for playout in &mut self.playouts {
                    playout.due.get_or_insert(self.now);
                }
            }
            Event::MediaAdded(added) => {
                if let Some(playout) = self
                    .playouts
                    .iter_mut()
                    .find(|p| p.clip.kind == added.kind && p.mid.is_none())
                {
                    playout.mid = Some(added.mid);
                }
            }
            Event::KeyframeRequest(request) => {
                // The clip's first frame is its key frame.
                if let Some(playout) = self
                    .playouts
                    .iter_mut()
                    .find(|p| p.mid == Some(request.mid))
                {
                    playout.next = 0;
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) if self.connected => {
                self.connected = false;
                self.events.push_back(LinkEvent::Disconnected);
            }
            Event::ChannelOpen(id, label) => {
                if label == CHAT_LABEL && self.chat.is_none_or(|chat| chat == id) {
                    self.chat = Some(id);
                    self.chat_open = true;
                    self.events.push_back(LinkEvent::ChatOpen);
                    while let Some(text) = self.chat_queue.front() {
                        let text = text.clone();
                        if !self.write_chat(&text)? {
                            break;
                        }
                        self.chat_queue.pop_front();
                    }
                } else if label == FILE_LABEL && self.files.len() < MAX_INCOMING {
                    self.files.insert(id, Incoming::new(self.now));
                } else {
                    // Later versions' channels, or a ninth file at once:
                    // closing tells the sender so at once.
                    tracing::debug!(label, "closing a data channel this peer does not take");
                    self.rtc.direct_api().close_data_channel(id);
                }
            }
            Event::ChannelData(data) if Some(data.id) == self.chat => {
                self.events
                    .push_back(match ChannelMessage::decode(data.binary, &data.data) {
                        Ok(message) => LinkEvent::Message(message),
                        Err(e) => LinkEvent::BadMessage(e),
                    });
            }
            Event::ChannelData(data) if self.files.contains_key(&data.id) => {
                self.on_file_message(data.id, data.binary, &data.data);
            }
            Event::ChannelClose(id) if self.files.contains_key(&id) => {
                if let Some(file) = self.files.remove(&id)
                    && file.under_way()
                {
                    self.events.push_back(LinkEvent::FileStopped {
                        channel: id,
                        why: "the sender stopped, or the connection closed".into(),
                    });
                }
            }
            Event::ChannelClose(id) if Some(id) == self.chat => {
                self.chat = None;
                self.chat_open = false;
            }
            Event::MediaData(data) => {
                match self.rtc.media(data.mid).map(|m| m.kind()) {
                    Some(MediaKind::Audio) => self.media.audio_frames += 1,
                    Some(MediaKind::Video) => self.media.video_frames += 1,
                    None => {}
                }
                self.media.bytes += data.data.len() as u64;
            }
            Event::Closed => self.events.push_back(LinkEvent::Closed),
            _ => {}
        }
        Ok(())
    }

    fn on_file_message(&mut self, channel: ChannelId, binary: bool, data: &[u8]) {
        let Some(file) = self.files.get_mut(&channel) else {
            return;
        };
        let offered = file.offer().is_some();
        let event = match file.take(binary, data) {
            Ok(Step::Offered(offer)) => LinkEvent::FileOffered { channel, offer },
            Ok(Step::Data(bytes)) => LinkEvent::FileData {
                channel,
                data: bytes.to_vec(),
            },
            Ok(Step::Ended) => LinkEvent::FileEnded { channel },
            Err(e) => {
                tracing::warn!("stopped a file transfer: it sent {e}");
                self.close_file(channel);
                // A channel without a valid offer has nothing to tell.
                if !offered {
                    return;
                }
                LinkEvent::FileStopped {
                    channel,
                    why: format!("it sent {e}"),
                }
            }
        };
        self.events.push_back(event);
    }

    /// Takes the file offered on `channel`: its bytes come as
    /// [`LinkEvent::FileData`].
    pub fn accept_file(&mut self, channel: ChannelId) -> Result<(), LinkError> {
        if self.files.get_mut(&channel).is_some_and(Incoming::accept) {
            self.write_file_channel(channel, files::ACCEPT);
        }
        self.drive()
    }

    /// Turns down the file offered on `channel`.
    pub fn decline_file(&mut self, channel: ChannelId) -> Result<(), LinkError> {
        self.write_file_channel(channel, files::DECLINE);
        self.close_file(channel);
        self.drive()
    }

    /// The file of `channel` is kept: closing its channel tells the sender
    /// it was delivered.
    pub fn file_kept(&mut self, channel: ChannelId) -> Result<(), LinkError> {
        self.close_file(channel);
        self.drive()
    }

    /// The file of `channel` cannot be kept (no space, a write failed):
    /// the sender is told so, not why.
    pub fn file_failed(&mut self, channel: ChannelId) -> Result<(), LinkError> {
        self.write_file_channel(channel, files::FAILED);
        self.close_file(channel);
        self.drive()
    }

    fn write_file_channel(&mut self, channel: ChannelId, text: &str) {
        if let Some(mut open) = self.rtc.channel(channel)
            && let Err(e) = open.write(false, text.as_bytes())
        {
            tracing::debug!("a file channel refused {text}: {e}");
        }
    }

    fn close_file(&mut self, channel: ChannelId) {
        if self.files.remove(&channel).is_some() {
            self.rtc.direct_api().close_data_channel(channel);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next signal to send to the other side.
    pub fn poll_signal(&mut self) -> Option<Value> {
        self.signals.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When to call [`Link::handle_timeout`].
    pub fn timeout(&self) -> Instant {
        self.playouts
            .iter()
            .filter(|p| p.mid.is_some())
            .filter_map(|p| p.due)
            .chain(self.files.values().filter_map(Incoming::deadline))
            .fold(self.timeout, Instant::min)
    }

    /// Media received so far.
    pub fn media(&self) -> MediaCounts {
        self.media
    }

    /// Whether the chat channel is open: a message sent now goes now.
    pub fn is_chat_open(&self) -> bool {
        self.chat_open
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// False once the link is closed, by either side.
    pub fn is_alive(&self) -> bool {
        self.rtc.is_alive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const A: &str = "127.0.0.1:1000";

    fn host(addr: &str) -> Candidate {
        Candidate::host(addr.parse().unwrap(), "udp").unwrap()
    }
    const B: &str = "127.0.0.1:2000";

    /// Two links joined in memory: signals handed across at once,
    /// datagrams delivered at once, time moved on when nothing is in flight.
    struct Pair {
        a: Link,
        b: Link,
        now: Instant,
        events: Vec<(char, LinkEvent)>,
    }

    impl Pair {
        fn new() -> Pair {
            Pair::sending(false)
        }

        /// With `media`, `a` sends the test pattern and the tone.
        fn sending(media: bool) -> Pair {
            let now = Instant::now();
            let mut a = Link::new(vec![host(A)], false, now).unwrap();
            let b = Link::new(vec![host(B)], true, now).unwrap();
            if media {
                a.send_media();
            }
            a.offer().unwrap();
            Pair {
                a,
                b,
                now,
                events: Vec::new(),
            }
        }

        /// Runs until `done` or 30 s of simulated time.
        fn run_until(&mut self, done: impl Fn(&Pair) -> bool) {
            let end = self.now + Duration::from_secs(30);
            while !done(self) {
                assert!(self.now < end, "not done after 30 s: {:?}", self.events);
                let mut moved = false;
                while let Some(signal) = self.a.poll_signal() {
                    let signal = Signal::decode(&signal).unwrap();
                    self.b.handle_signal(signal).unwrap();
                    moved = true;
                }
                while let Some(signal) = self.b.poll_signal() {
                    let signal = Signal::decode(&signal).unwrap();
                    self.a.handle_signal(signal).unwrap();
                    moved = true;
                }
                while let Some(t) = self.a.poll_transmit() {
                    assert_eq!(t.destination, B.parse().unwrap());
                    assert!(
                        self.b
                            .handle_datagram(self.now, t.source, t.destination, &t.contents)
                            .unwrap()
                    );
                    moved = true;
                }
                while let Some(t) = self.b.poll_transmit() {
                    assert_eq!(t.destination, A.parse().unwrap());
                    assert!(
                        self.a
                            .handle_datagram(self.now, t.source, t.destination, &t.contents)
                            .unwrap()
                    );
                    moved = true;
                }
                while let Some(e) = self.a.poll_event() {
                    self.events.push(('a', e));
                    moved = true;
                }
                while let Some(e) = self.b.poll_event() {
                    self.events.push(('b', e));
                    moved = true;
                }
                if !moved {
                    self.now = self.a.timeout().min(self.b.timeout()).max(self.now);
                    self.now += Duration::from_millis(1);
                    self.a.handle_timeout(self.now).unwrap();
                    self.b.handle_timeout(self.now).unwrap();
                }
            }
        }

        fn saw(&self, side: char, event: &LinkEvent) -> bool {
            self.events.iter().any(|(s, e)| *s == side && e == event)
        }
    }

    fn chat(text: &str) -> ChannelMessage {
        ChannelMessage::chat(text, false).unwrap()
    }

    #[test]
    fn media_goes_out_at_its_own_pace_and_arrives_frame_by_frame() {
        // Both ways: from the side that offers, and from the one that answers.
        let mut pair = Pair::sending(true);
        pair.b.send_media();
        pair.run_until(|p| p.saw('a', &LinkEvent::Connected));
        let start = pair.now;
        // One loop of the pattern: 30 frames at 15 a second.
        pair.run_until(|p| p.b.media().video_frames >= 30 && p.a.media().video_frames >= 30);
        let took = pair.now - start;
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2500),
            "30 frames in {took:?} of simulated time"
        );
        let (video, audio) = pair.a.frames_sent();
        assert!((30..=32).contains(&video), "{video} video frames sent");
        assert!((95..=125).contains(&audio), "{audio} audio frames sent");
        for got in [pair.a.media(), pair.b.media()] {
            assert!(got.audio_frames >= 90, "{got:?}");
            assert!(got.bytes > 40_000, "{got:?}");
        }
    }

    #[test]
    fn a_stalled_player_skips_ahead_in_rtp_time_too_and_drops_no_frame() {
        for clip in [clip::pattern(), clip::tone()] {
            let start = Instant::now();
            let mut playout = Playout {
                clip,
                mid: None,
                next: 0,
                due: Some(start),
                rtp: 0,
                sent: 0,
            };
            let mut written = Vec::new();
            let mut take = |playout: &mut Playout, now| {
                playout.take_due(now, |frame, due, rtp| {
                    written.push((frame.data.clone(), due, rtp))
                });
            };
            // On time: two frames, one frame's length apart on both clocks.
            let first = clip.duration(&clip.frames[0]);
            take(&mut playout, start + first);
            // A 3 s stall: the next frame goes at once, 3 s on in RTP time
            // too, and it is the next frame of the clip.
            let stall = Duration::from_secs(3);
            take(&mut playout, start + stall);
            let rate = clip.clock_rate.get();
            let [a, b, c] = &written[..] else {
                panic!("{} frames written", written.len());
            };
            assert_eq!((a.1, b.1, c.1), (start, start + first, start + stall));
            assert_eq!(a.2.numer(), 0);
            assert_eq!(b.2.numer(), u64::from(clip.frames[0].ticks));
            assert_eq!(a.2.frequency(), clip.clock_rate);
            let expected = u64::from(rate) * 3;
            let tick = u64::from(clip.frames[1].ticks);
            assert!(
                c.2.numer().abs_diff(expected) <= tick,
                "{:?}: after the stall, RTP time {} for {expected}",
                clip.kind,
                c.2.numer()
            );
            assert_eq!(c.0, clip.frames[2].data, "no frame skipped");
        }
    }

    #[test]
    fn two_links_connect_and_chat_both_ways() {
        let mut pair = Pair::new();
        // Written before the channel opens: held, then sent in order.
        pair.a.send(&chat("one")).unwrap();
        pair.a.send(&chat("two")).unwrap();
        pair.run_until(|p| p.saw('a', &LinkEvent::ChatOpen) && p.saw('b', &LinkEvent::ChatOpen));
        assert!(pair.a.is_connected() && pair.b.is_connected());
        pair.b.send(&chat("three")).unwrap();
        pair.run_until(|p| {
            p.saw('b', &LinkEvent::Message(chat("two")))
                && p.saw('a', &LinkEvent::Message(chat("three")))
        });
        let received: Vec<_> = pair
            .events
            .iter()
            .filter_map(|(side, e)| match e {
                LinkEvent::Message(m) if *side == 'b' => Some(m.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(received, [chat("one"), chat("two")]);
    }

    #[test]
    fn a_bad_message_is_reported_and_the_channel_goes_on() {
        let mut pair = Pair::new();
        pair.run_until(|p| p.saw('b', &LinkEvent::ChatOpen));
        let id = pair.a.chat.unwrap();
        assert!(
            pair.a
                .rtc
                .channel(id)
                .unwrap()
                .write(false, b"{\"type\":\"nope\"}")
                .unwrap()
        );
        pair.a.drive().unwrap();
        pair.a.send(&chat("after")).unwrap();
        pair.run_until(|p| p.saw('b', &LinkEvent::Message(chat("after"))));
        assert!(pair.saw(
            'b',
            &LinkEvent::BadMessage(ChatError::UnknownType("\"nope\"".into()))
        ));
    }

    #[test]
    fn bad_signals_leave_the_link_as_it_was() {
        let mut pair = Pair::new();
        let garbage = Signal::Description {
            kind: SdpKind::Answer,
            sdp: "v=0\r\nnonsense".into(),
        };
        assert!(pair.a.handle_signal(garbage).is_err());
        assert!(
            pair.b
                .handle_signal(Signal::Candidate(Some("candidate:x".into())))
                .is_err()
        );
        pair.run_until(|p| p.saw('a', &LinkEvent::ChatOpen) && p.saw('b', &LinkEvent::ChatOpen));
    }

    #[test]
    fn the_chat_queue_is_bounded() {
        let mut link = Link::new(vec![host(A)], false, Instant::now()).unwrap();
        for _ in 0..MAX_CHAT_QUEUE {
            link.send(&chat("x")).unwrap();
        }
        assert!(matches!(
            link.send(&chat("x")),
            Err(LinkError::ChatQueueFull)
        ));
    }

    #[test]
    fn a_resend_repeats_the_outstanding_offer_and_an_impolite_side_keeps_its_own() {
        let mut pair = Pair::new();
        let offer = pair.a.poll_signal().unwrap();
        pair.a.handle_signal(Signal::Resend).unwrap();
        assert_eq!(pair.a.poll_signal(), Some(offer.clone()));
        // B offers too (glare): A, impolite, ignores it and keeps waiting.
        pair.b.offer().unwrap();
        let crossing = Signal::decode(&pair.b.poll_signal().unwrap()).unwrap();
        pair.a.handle_signal(crossing).unwrap();
        assert_eq!(pair.a.poll_signal(), None);
        // B, polite, drops its offer and answers A's.
        pair.b
            .handle_signal(Signal::decode(&offer).unwrap())
            .unwrap();
        pair.run_until(|p| p.saw('a', &LinkEvent::ChatOpen) && p.saw('b', &LinkEvent::ChatOpen));
    }
}
