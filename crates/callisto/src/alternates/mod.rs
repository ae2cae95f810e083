//! Where the TURN server sends clients instead of allocating for them (300
//! Try Alternate): the `--turn-alternate-server` flags, fixed for the life
//! of the process, or `--turn-alternate-servers-file`, read at start and
//! again on SIGHUP. The file is what lets an operator drain a server: point
//! it at others, and new clients go there while the calls it relays go on,
//! which a restart (ending them) cannot do. Clients are sent only to
//! alternates that answer ([`checks`]).
//!
//! The file holds one server per line, `IP:PORT` for UDP and TCP clients or
//! `tls IP:PORT` for TLS ones; `#` starts a comment, blank lines are
//! ignored. An empty file sends nobody away.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use callisto_turn::server::{Alternates, Shared};

use crate::cli::TurnArgs;

pub mod checks;

/// The alternates to start with, checked; fails with what to fix.
pub fn at_start(args: &TurnArgs) -> anyhow::Result<Alternates> {
    let alternates = match &args.turn_alternate_servers_file {
        Some(path) => read(path)?,
        None => Alternates {
            udp_tcp: args.turn_alternate_servers.clone(),
            tls: args.turn_tls_alternate_servers.clone(),
        },
    };
    check(&alternates, Own::of(args))?;
    announce(&alternates, checking(args).is_some());
    Ok(alternates)
}

/// Keeps the server's alternates in force from here on: those configured,
/// less those that do not answer (see [`checks`]), and with
/// `--turn-alternate-servers-file`, what the file says after each SIGHUP.
/// A file that cannot be read, or says something wrong, is logged and
/// changes nothing.
pub fn keep_in_force(
    args: &TurnArgs,
    configured: Alternates,
    shared: Arc<Shared>,
    health: &crate::health::Health,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(configured);
    checks::spawn(shared, rx, checking(args), health);
    let Some(path) = args.turn_alternate_servers_file.clone() else {
        return Ok(());
    };
    let own = Own::of(args);
    let checked = checking(args).is_some();
    let file = path.clone();
    crate::flag_files::reread_on_hangup(
        path,
        read,
        move |read| {
            match read.and_then(|a| check(&a, own).map(|()| a)) {
                Ok(alternates) => {
                    announce(&alternates, checked);
                    // Fails only once the checks have ended, with the server.
                    let _ = tx.send(alternates);
                }
                Err(e) => tracing::error!(
                    file = %file.display(),
                    "alternate TURN servers unchanged: {e:#}"
                ),
            }
        },
        health,
        "the --turn-alternate-servers-file re-reader",
    )
}

/// How often to check the alternates, if at all.
pub fn checking(args: &TurnArgs) -> Option<Duration> {
    (args.turn_alternate_check > 0).then(|| Duration::from_secs(args.turn_alternate_check))
}

fn read(path: &Path) -> anyhow::Result<Alternates> {
    crate::flag_files::read(
        path,
        "--turn-alternate-servers-file",
        "create it, empty to send nobody away",
        parse,
    )
}

/// The file's servers, or which line is wrong and why.
pub fn parse(text: &str) -> Result<Alternates, String> {
    let mut alternates = Alternates::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let (list, addr) = match line.split_once(char::is_whitespace) {
            Some(("tls", rest)) => (&mut alternates.tls, rest.trim()),
            Some(_) => return Err(line_error(n, line)),
            None => (&mut alternates.udp_tcp, line),
        };
        list.push(addr.parse().map_err(|_| line_error(n, line))?);
    }
    Ok(alternates)
}

fn line_error(n: usize, line: &str) -> String {
    format!(
        "line {}: {line:?} is not IP:PORT or tls IP:PORT (such as 192.0.2.10:3478 or tls [2001:db8::10]:5349)",
        n + 1
    )
}

/// This server's own listening addresses: for UDP and TCP, and for TLS.
#[derive(Clone, Copy)]
struct Own(SocketAddr, Option<SocketAddr>);

impl Own {
    fn of(args: &TurnArgs) -> Own {
        Own(args.turn_listen, args.turn_tls_listen)
    }
}

/// Refuses alternates a client could not reach, or that are this server
/// itself (each client would come back to be sent away again).
fn check(alternates: &Alternates, own: Own) -> anyhow::Result<()> {
    let lists = [
        ("--turn-alternate-server", &alternates.udp_tcp, Some(own.0)),
        ("--turn-tls-alternate-server", &alternates.tls, own.1),
    ];
    for (flag, list, own) in lists {
        for a in list {
            if a.ip().is_unspecified() || a.port() == 0 {
                bail!(
                    "{flag} {a}: clients need an address and a port to go to, such as 192.0.2.10:3478"
                );
            }
            if Some(*a) == own {
                bail!(
                    "{flag} {a} is this server's own listening address: clients would be sent back here"
                );
            }
        }
    }
    Ok(())
}

fn announce(alternates: &Alternates, checked: bool) {
    if alternates.is_empty() {
        tracing::info!("TURN clients are served here: no alternate servers");
    } else if checked {
        tracing::info!(
            udp_tcp = ?alternates.udp_tcp,
            tls = ?alternates.tls,
            "TURN clients that ask for an allocation are sent to alternate servers, in turn, to those that answer"
        );
    } else {
        tracing::info!(
            udp_tcp = ?alternates.udp_tcp,
            tls = ?alternates.tls,
            "TURN clients that ask for an allocation are sent to alternate servers, in turn, unchecked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_file_names_servers_per_transport_with_comments() {
        let text = "# spread over two\n192.0.2.10:3478\n\n  [2001:db8::10]:3478  # the IPv6 one\ntls 192.0.2.20:5349\n";
        assert_eq!(
            parse(text),
            Ok(Alternates {
                udp_tcp: vec![
                    "192.0.2.10:3478".parse().unwrap(),
                    "[2001:db8::10]:3478".parse().unwrap()
                ],
                tls: vec!["192.0.2.20:5349".parse().unwrap()],
            })
        );
        assert_eq!(parse(""), Ok(Alternates::default()));
        for (bad, line) in [
            ("192.0.2.10", 1),
            ("# ok\nturn.example.org:3478", 2),
            ("udp 192.0.2.10:3478", 1),
            ("tls", 1),
            ("192.0.2.10:3478 192.0.2.11:3478", 1),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.starts_with(&format!("line {line}: ")), "{bad:?}: {err}");
        }
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| (std::net::Ipv4Addr::from(ip), p).into()),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| (std::net::Ipv6Addr::from(ip), p).into()),
        ]
    }

    proptest! {
        #[test]
        fn any_text_parses_or_names_its_line(text in "(?s).{0,400}") {
            if let Err(e) = parse(&text) {
                prop_assert!(e.starts_with("line "), "{}", e);
            }
        }

        #[test]
        fn written_lists_read_back(
            udp_tcp in prop::collection::vec(any_addr(), 0..8),
            tls in prop::collection::vec(any_addr(), 0..8),
        ) {
            let mut text = String::new();
            for a in &udp_tcp {
                text.push_str(&format!("{a} # comment\n"));
            }
            for a in &tls {
                text.push_str(&format!("\ttls   {a}\r\n"));
            }
            prop_assert_eq!(parse(&text), Ok(Alternates { udp_tcp, tls }));
        }
    }
}
