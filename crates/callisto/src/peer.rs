//! `callisto peer`: the native peer (crate `callisto-peer`) on the command
//! line. Lines on stdin go to the chat; what happens comes out on stdout,
//! as text for people or JSON lines for scripts; logs go to stderr.

use std::future::Future;
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;
use callisto_peer::{Command, PeerConfig, PeerEvent, RelayUse, Running, Summary};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cli::PeerArgs;

/// Runs the peer until `--for` is over, `stop` resolves, or the peer fails.
pub async fn run(args: PeerArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(seconds) = args.duration
        && !(seconds.is_finite() && seconds > 0.0)
    {
        anyhow::bail!("--for {seconds}: give a number of seconds above 0");
    }
    if let Some(dir) = &args.save_files
        && !dir.is_dir()
    {
        anyhow::bail!(
            "--save-files {}: not a folder; give one that exists",
            dir.display()
        );
    }
    let config = PeerConfig {
        server: args.target.server.clone(),
        room: args.room.clone(),
        name: args.name.clone(),
        watching: args.watch,
        send_media: args.send_media,
        save_files: args.save_files.clone(),
        relay_over: args.relay_over.into(),
        access: args.target.access.clone(),
        bind: args.bind,
        pin: args.target.tls_fingerprint,
        relay: match (args.relay, args.relay_only) {
            (_, true) => RelayUse::Only,
            (true, false) => RelayUse::Also,
            (false, false) => RelayUse::Never,
        },
    };
    let Running {
        commands,
        mut events,
        task: peer,
    } = callisto_peer::spawn(config);
    read_stdin(commands.clone());

    let deadline = async {
        match args.duration {
            Some(seconds) => tokio::time::sleep(Duration::from_secs_f64(seconds)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop, deadline);
    let mut leaving = false;
    let mut said = false;
    let mut out = std::io::stdout().lock();
    // Events until the peer ends (the sender is dropped with it).
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    // On the first join only: not again after a restart
                    // of the server.
                    if let PeerEvent::Joined { .. } = event
                        && !std::mem::replace(&mut said, true)
                    {
                        for text in &args.say {
                            let _ = commands.send(Command::Chat { text: text.clone(), to: None });
                        }
                    }
                    print_event(&mut out, &event, args.json)?;
                }
                None => break,
            },
            () = &mut stop, if !leaving => {
                leaving = true;
                let _ = commands.send(Command::Leave);
            }
            () = &mut deadline, if !leaving => {
                leaving = true;
                let _ = commands.send(Command::Leave);
            }
        }
    }
    let summary = peer
        .await
        .context("the peer stopped unexpectedly")?
        .with_context(|| format!("peer in room {:?} on {}", args.room, args.target.server))?;
    print_summary(&mut out, &summary, args.json)?;
    Ok(())
}

/// Each line read is a chat message to everyone. The thread ends with
/// stdin, or when the peer is gone.
fn read_stdin(commands: mpsc::UnboundedSender<Command>) {
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(text) = line else { return };
            if text.trim().is_empty() {
                continue;
            }
            if commands.send(Command::Chat { text, to: None }).is_err() {
                return;
            }
        }
    });
}

fn print_event(out: &mut impl Write, event: &PeerEvent, as_json: bool) -> std::io::Result<()> {
    if as_json {
        let value = match event {
            PeerEvent::Joined { id, peers } => json!({"event": "joined", "id": id,
                "peers": peers.iter().map(|p| json!({"id": p.id, "name": p.name, "watching": p.watching})).collect::<Vec<_>>()}),
            PeerEvent::Knocking => json!({"event": "knocking"}),
            PeerEvent::SignalingLost { reason } => {
                json!({"event": "signaling-lost", "reason": reason})
            }
            PeerEvent::Rejoined { id, resumed } => {
                json!({"event": "rejoined", "id": id, "resumed": resumed})
            }
            PeerEvent::PeerJoined { id, name, watching } => {
                json!({"event": "peer-joined", "id": id, "name": name, "watching": watching})
            }
            PeerEvent::PeerLeft { id, name } => {
                json!({"event": "peer-left", "id": id, "name": name})
            }
            PeerEvent::Connected { id, name } => {
                json!({"event": "connected", "id": id, "name": name})
            }
            PeerEvent::Disconnected { id, name } => {
                json!({"event": "disconnected", "id": id, "name": name})
            }
            PeerEvent::Chat {
                from,
                name,
                text,
                private,
            } => json!({"event": "chat", "from": from,
                "name": name, "text": text, "private": private}),
            PeerEvent::NotSent { to, reason } => {
                json!({"event": "not-sent", "to": to, "reason": reason})
            }
            PeerEvent::ServerError { code, message } => {
                json!({"event": "server-error", "code": code,
                "message": message})
            }
            PeerEvent::FileSaved {
                from,
                name,
                file,
                size,
                path,
            } => json!({"event": "file-saved", "from": from, "name": name,
                "file": file, "size": size, "path": path}),
            PeerEvent::FileDeclined {
                from,
                name,
                file,
                size,
            } => json!({"event": "file-declined", "from": from, "name": name,
                "file": file, "size": size}),
            PeerEvent::FileFailed {
                from,
                name,
                file,
                why,
            } => json!({"event": "file-failed", "from": from, "name": name,
                "file": file, "why": why}),
        };
        writeln!(out, "{value}")?;
    } else {
        match event {
            PeerEvent::Joined { peers, .. } if peers.is_empty() => {
                writeln!(out, "* joined; nobody else is here yet")?
            }
            PeerEvent::Joined { peers, .. } => {
                let names: Vec<&str> = peers
                    .iter()
                    .filter(|p| !p.watching)
                    .map(|p| p.name.as_str())
                    .collect();
                let watching = peers.len() - names.len();
                match (names.is_empty(), watching) {
                    (true, _) => writeln!(out, "* joined; {watching} watching")?,
                    (false, 0) => writeln!(out, "* joined, with {}", names.join(", "))?,
                    (false, _) => writeln!(
                        out,
                        "* joined, with {}; {watching} watching",
                        names.join(", ")
                    )?,
                }
            }
            PeerEvent::Knocking => writeln!(out, "* the room is locked: waiting to be let in")?,
            PeerEvent::SignalingLost { reason } => {
                writeln!(out, "* lost the server ({reason}); connecting again")?
            }
            PeerEvent::Rejoined { resumed: true, .. } => writeln!(out, "* back with the server")?,
            PeerEvent::Rejoined { resumed: false, .. } => {
                writeln!(out, "* back with the server, joined anew")?
            }
            PeerEvent::PeerJoined {
                name,
                watching: true,
                ..
            } => writeln!(out, "* {name} joined to watch")?,
            PeerEvent::PeerJoined { name, .. } => writeln!(out, "* {name} joined")?,
            PeerEvent::PeerLeft { name, .. } => writeln!(out, "* {name} left")?,
            PeerEvent::Connected { name, .. } => writeln!(out, "* connected to {name}")?,
            PeerEvent::Disconnected { name, .. } => {
                writeln!(out, "* lost the connection to {name}")?
            }
            PeerEvent::Chat {
                name,
                text,
                private: false,
                ..
            } => writeln!(out, "{name}: {text}")?,
            PeerEvent::Chat {
                name,
                text,
                private: true,
                ..
            } => writeln!(out, "{name} (privately): {text}")?,
            PeerEvent::NotSent { to, reason } => writeln!(out, "* not sent to {to}: {reason}")?,
            PeerEvent::ServerError { code, message } => {
                writeln!(out, "* server: {code}: {message}")?
            }
            PeerEvent::FileSaved {
                name, file, path, ..
            } => writeln!(out, "* {name} sent {file}: saved as {}", path.display())?,
            PeerEvent::FileDeclined { name, file, .. } => writeln!(
                out,
                "* {name} offered {file}: declined (--save-files DIR takes files)"
            )?,
            PeerEvent::FileFailed {
                name, file, why, ..
            } => writeln!(out, "* {file} from {name} was not saved: {why}")?,
        }
    }
    out.flush()
}

fn print_summary(out: &mut impl Write, summary: &Summary, as_json: bool) -> std::io::Result<()> {
    if as_json {
        let peers: Vec<_> = summary
            .peers
            .iter()
            .map(|p| {
                json!({"id": p.id, "name": p.name, "connected": p.connected,
                    "audioFrames": p.media.audio_frames, "videoFrames": p.media.video_frames,
                    "bytes": p.media.bytes,
                    "sentVideoFrames": p.sent.0, "sentAudioFrames": p.sent.1})
            })
            .collect();
        writeln!(out, "{}", json!({"event": "left", "peers": peers}))?;
    } else {
        writeln!(out, "* left")?;
        for p in &summary.peers {
            writeln!(
                out,
                "  {}: {}, {} audio and {} video frames received ({} bytes)",
                p.name,
                if p.connected {
                    "connected"
                } else {
                    "never connected"
                },
                p.media.audio_frames,
                p.media.video_frames,
                p.media.bytes
            )?;
            if p.sent != (0, 0) {
                writeln!(
                    out,
                    "    sent {} video and {} audio frames",
                    p.sent.0, p.sent.1
                )?;
            }
        }
    }
    out.flush()
}
