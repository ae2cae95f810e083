//! The built-in STUN/TURN server as the command line configures it, and the
//! `iceServers` (with fresh time-limited credentials) that `serve` puts into
//! every `welcome`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use callisto_protocol::IceServer;
use callisto_turn::auth::{Credentials, Secrets, rest_credentials};
use callisto_turn::net::{
    ConnectionLimits, KernelRelay, KernelRelayConfig, Listen, RelayConfig, TurnService,
};
use callisto_turn::policy::PeerPolicy;
use callisto_turn::server::{Alternates, Config, DefaultFamily, Shared};

use crate::cli::{AllocationFamily, TurnArgs};
use crate::secrets::SecretsFile;

/// A running TURN service and what browsers need to use it.
pub struct RunningTurn {
    pub service: TurnService,
    pub ice: IceCredentials,
    /// Whether every relay address is a loopback one: such relays serve
    /// this machine's clients only.
    loopback_relays: bool,
}

/// Builds `iceServers` entries with credentials valid for `ttl`.
#[derive(Clone)]
pub struct IceCredentials {
    stun_url: String,
    turn_urls: Vec<String>,
    /// The host name in `turns:` URLs.
    tls_name: String,
    /// The first signs; it may change while the server runs.
    secrets: Secrets,
    ttl: Duration,
}

impl IceCredentials {
    pub fn ice_servers(&self) -> Vec<IceServer> {
        let stun = IceServer {
            urls: vec![self.stun_url.clone()],
            username: None,
            credential: None,
        };
        let Some(secret) = self.secrets.signing() else {
            // Static users only: the browsers have no credentials to use.
            return vec![stun];
        };
        vec![
            stun,
            minted_ice_server(self.turn_urls.clone(), &secret, self.ttl),
        ]
    }
}

/// One `iceServers` entry for `urls` with TURN REST credentials (coturn's
/// `use-auth-secret`) signed with `secret`, valid for `ttl` from now. The
/// user part is random, so that per-username quotas apply per browser.
pub fn minted_ice_server(urls: Vec<String>, secret: &[u8], ttl: Duration) -> IceServer {
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + ttl.as_secs();
    let (username, credential) = rest_credentials(secret, &random_hex(8), expires);
    IceServer {
        urls,
        username: Some(username),
        credential: Some(credential),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // The OS random source failing is unrecoverable and not caused by input.
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Starts the TURN server. `generate_secret`: create a random shared secret
/// when none was configured (what `serve` does for its browsers).
/// `new_signer` is called when another secret signs (`--turn-secrets-file`,
/// SIGHUP): credentials handed out before may be refused soon.
pub async fn start(
    args: &TurnArgs,
    tls: Option<Arc<rustls::ServerConfig>>,
    tls_host: Option<&str>,
    generate_secret: bool,
    credential_ttl: Duration,
    new_signer: impl Fn() + Send + 'static,
    health: &crate::health::Health,
) -> anyhow::Result<RunningTurn> {
    let relay_ips = match one_per_family(&args.turn_relay_ips, "--turn-relay-ip")? {
        ips if !ips.is_empty() => ips,
        _ if !args.turn_listen.ip().is_unspecified() => vec![args.turn_listen.ip()],
        _ => bail!(
            "--turn-listen {} listens on every interface, so it cannot tell which address relays should use: add --turn-relay-ip with this machine's address",
            args.turn_listen
        ),
    };
    let external_ips = one_per_family(&args.turn_external_ips, "--turn-external-ip")?;
    if let Some(e) = external_ips
        .iter()
        .find(|e| !relay_ips.iter().any(|r| r.is_ipv4() == e.is_ipv4()))
    {
        bail!(
            "--turn-external-ip {e} stands for no relay address: add a --turn-relay-ip of its family"
        );
    }
    // The relay address of the listening address's family: the one the
    // URLs name (or its external address), and the kernel relay's.
    let relay_ip = relay_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == args.turn_listen.is_ipv4())
        .unwrap_or(relay_ips[0]);
    if args.turn_tls_listen.is_some() && tls.is_none() {
        bail!(
            "--turn-tls-listen needs a certificate: add --tls-cert and --tls-key, or --tls-self-signed"
        );
    }
    let alternates = crate::alternates::at_start(args)?;
    let mut credentials = Credentials::new(args.turn_realm.clone());
    for user in &args.turn_users {
        credentials.add_user(&user.name, &user.password);
    }
    let secrets = match (&args.turn_secrets_file, &args.turn_secret) {
        (Some(path), _) => crate::secrets::read(path, SecretsFile::Turn)?,
        (None, Some(s)) => vec![s.as_bytes().to_vec()],
        (None, None) if generate_secret => vec![random_hex(32).into_bytes()],
        (None, None) => Vec::new(),
    };
    credentials.secrets().set(secrets);
    if let Some(path) = &args.turn_secrets_file {
        crate::secrets::reload_on_hangup(
            path.clone(),
            SecretsFile::Turn,
            credentials.secrets().clone(),
            new_signer,
            health,
        )?;
    }
    if !credentials.has_any() {
        bail!(
            "nobody could use this TURN server: add --turn-user NAME:PASSWORD or --turn-secret SECRET"
        );
    }
    if !args.turn_kernel_relay.is_empty()
        && (args.turn_listen.ip().is_unspecified()
            || relay_ip.is_ipv4() != args.turn_listen.is_ipv4())
    {
        bail!(
            "--turn-kernel-relay needs --turn-listen on one address, and a --turn-relay-ip of its family (not {} and {relay_ip}): it matches packets by the address they were sent to",
            args.turn_listen
        );
    }
    let has_ipv4_relay = relay_ips.iter().any(IpAddr::is_ipv4);
    let allocation_family = args.turn_allocation_family.unwrap_or(if has_ipv4_relay {
        AllocationFamily::Ipv4
    } else {
        // RFC 8656's default (IPv4) would give browsers, which ask for no
        // family, no relay at all on an IPv6-only server.
        AllocationFamily::Client
    });
    if allocation_family == AllocationFamily::Ipv4 && !has_ipv4_relay {
        tracing::warn!(
            "no IPv4 relay address, and --turn-allocation-family ipv4: clients that ask for no family, browsers among them, get none (440); drop the flag, or add an IPv4 --turn-relay-ip"
        );
    }
    let kernel = kernel_relay(args, &relay_ips, relay_ip)?.map(Arc::new);
    let secrets = credentials.secrets().clone();
    let config = Config {
        credentials,
        policy: PeerPolicy::new(args.turn_allow_peers.clone(), args.turn_deny_peers.clone()),
        relay_ips: relay_ips.clone(),
        relay_ports: args.turn_port_range.0..=args.turn_port_range.1,
        default_family: match allocation_family {
            AllocationFamily::Ipv4 => DefaultFamily::Ipv4,
            AllocationFamily::Ipv6 => DefaultFamily::Ipv6,
            AllocationFamily::Client => DefaultFamily::Client,
        },
        external_ips,
        max_allocations: args.turn_max_allocations,
        user_quota: args.turn_user_quota,
        source_quota: args.turn_max_allocations_per_ip as usize,
        bps_per_allocation: args.turn_bps_per_allocation,
        unauth_rate: args.turn_unauth_rate,
        unauth_allowance: args.turn_unauth_allowance,
        // In force once they answer (crate::alternates::checks), unless
        // unchecked.
        alternates: match crate::alternates::checking(args) {
            Some(_) => Alternates::default(),
            None => alternates.clone(),
        },
        kernel_routes: kernel.is_some(),
        ..Config::default()
    };
    let mut nonce_secret = [0u8; 32];
    getrandom::fill(&mut nonce_secret).context("reading the OS random source")?;
    let mut shared = Shared::with_system_clock(config, &nonce_secret);
    // With a bandwidth limit, the workers take from the kernel's budgets,
    // so that the two together keep to it.
    if let Some(budgets) = kernel.as_ref().and_then(|k| k.budgets()) {
        shared.share_budgets(budgets);
    }
    let shared = Arc::new(shared);
    crate::alternates::keep_in_force(args, alternates, shared.clone(), health)?;
    let advertised = shared.config.advertised_ip(relay_ip);
    let relay = RelayConfig {
        ipv4: relay_ips.iter().copied().find(IpAddr::is_ipv4),
        ipv6: relay_ips.iter().copied().find(IpAddr::is_ipv6),
        ports: args.turn_port_range.0..=args.turn_port_range.1,
    };
    let threads = args
        .turn_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listen = Listen {
        addr: args.turn_listen,
        tls_addr: args.turn_tls_listen,
        threads,
        connections: connection_limits(args),
    };
    let service = TurnService::start(listen, relay, shared, tls, kernel)
        .await
        .with_context(|| {
            format!(
                "cannot listen for TURN on {}: is another program (coturn?) using that port? Choose another with --turn-listen, or turn TURN off with --no-turn",
                args.turn_listen
            )
        })?;
    let public = |port: u16| format!("{}:{port}", host(advertised));
    let mut turn_urls = vec![
        format!("turn:{}?transport=udp", public(service.udp_addr.port())),
        format!("turn:{}?transport=tcp", public(service.tcp_addr.port())),
    ];
    let tls_name = tls_host.map_or_else(|| host(advertised), str::to_owned);
    if let Some(tls_addr) = service.tls_addr {
        turn_urls.push(format!(
            "turns:{tls_name}:{}?transport=tcp",
            tls_addr.port()
        ));
    }
    tracing::info!(
        udp = %service.udp_addr,
        tcp = %service.tcp_addr,
        tls = ?service.tls_addr,
        relay = ?relay_ips,
        threads,
        "STUN/TURN is serving"
    );
    Ok(RunningTurn {
        ice: IceCredentials {
            stun_url: format!("stun:{}", public(service.udp_addr.port())),
            turn_urls,
            tls_name,
            secrets,
            ttl: credential_ttl,
        },
        service,
        loopback_relays: relay_ips.iter().all(IpAddr::is_loopback),
    })
}

/// Whether relays, loopback ones or not, are of use to the clients of a
/// listener on `listening`: loopback relays serve only this machine.
fn relays_serve_clients_of(loopback_relays: bool, listening: IpAddr) -> bool {
    !loopback_relays || listening.is_loopback()
}

/// `ips` (the values of `flag`), which may hold one address per family.
fn one_per_family(ips: &[IpAddr], flag: &str) -> anyhow::Result<Vec<IpAddr>> {
    for family in [IpAddr::is_ipv4, IpAddr::is_ipv6] {
        let of_family: Vec<_> = ips.iter().filter(|ip| family(ip)).collect();
        if of_family.len() > 1 {
            bail!("{flag} takes one address per family, not {of_family:?}");
        }
    }
    Ok(ips.to_vec())
}

/// The flags' connection limits, the total held to what the open-file
/// limit leaves room for (see `open_files::connections_within_limit`).
fn connection_limits(args: &TurnArgs) -> ConnectionLimits {
    let total = crate::open_files::connections_within_limit(
        args.turn_max_connections as usize,
        "--turn-max-connections",
    );
    if let Ok(open_files) = crate::open_files::limit() {
        let needed = (args.turn_max_allocations as u64).saturating_add(total as u64);
        if open_files < needed {
            tracing::warn!(
                open_file_limit = open_files,
                "the open-file limit is below what --turn-max-allocations {} and the connections may use ({needed}): allocations past it will get 508 (Insufficient Capacity); raise it (systemd: LimitNOFILE=, shell: ulimit -n)",
                args.turn_max_allocations
            );
        }
    }
    ConnectionLimits {
        total,
        per_source: args.turn_max_connections_per_ip as usize,
    }
}

impl RunningTurn {
    /// Offers TURN over TLS on the web server's HTTPS port, `web`, too
    /// (the web server hands TURN's connections to this service), for
    /// browsers that may reach nothing else; false, offering nothing, when
    /// the web server serves other machines and the relays only this one,
    /// whose clients would get relays they cannot use.
    pub fn offer_tls_on_web_port(&mut self, web: SocketAddr) -> bool {
        if !relays_serve_clients_of(self.loopback_relays, web.ip()) {
            return false;
        }
        self.ice.turn_urls.push(format!(
            "turns:{}:{}?transport=tcp",
            self.ice.tls_name,
            web.port()
        ));
        true
    }
}

/// The addresses a running TURN service listens on.
#[derive(Debug, Clone, Copy)]
pub struct TurnAddrs {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
}

impl RunningTurn {
    pub fn addrs(&self) -> TurnAddrs {
        TurnAddrs {
            udp: self.service.udp_addr,
            tcp: self.service.tcp_addr,
            tls: self.service.tls_addr,
        }
    }
}

/// The kernel relay, attached, if `--turn-kernel-relay` asks for it, for
/// the relay addresses `relay_ips` (`relay_ip`: the listening address's
/// family's). Where it cannot run, an error, or with
/// `--turn-kernel-relay-optional` a warning and none.
fn kernel_relay(
    args: &TurnArgs,
    relay_ips: &[IpAddr],
    relay_ip: IpAddr,
) -> anyhow::Result<Option<KernelRelay>> {
    if args.turn_kernel_relay.is_empty() {
        return Ok(None);
    }
    let attached =
        kernel_relay_interfaces(&args.turn_kernel_relay, args.turn_listen.ip(), relay_ip).and_then(
            |interfaces| {
                Ok(KernelRelay::attach(&KernelRelayConfig {
                    interfaces,
                    max_allocations: args.turn_max_allocations,
                    relay_ip: ipv4_of(relay_ips),
                    external_ip: ipv4_of(&args.turn_external_ips),
                    // IPv6 routes come only for clients on IPv6, which an
                    // IPv4 listener has none of: without them the program's
                    // IPv6 maps take next to no kernel memory.
                    relay_ip6: ipv6_of(relay_ips).filter(|_| args.turn_listen.is_ipv6()),
                    external_ip6: ipv6_of(&args.turn_external_ips)
                        .filter(|_| args.turn_listen.is_ipv6()),
                    bytes_per_sec: args.turn_bps_per_allocation,
                })?)
            },
        );
    match attached {
        Ok(kernel) => Ok(Some(kernel)),
        Err(e) if args.turn_kernel_relay_optional => {
            tracing::warn!(
                error = format!("{e:#}"),
                "the kernel relay cannot run here (--turn-kernel-relay-optional): the server relays everything itself"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The IPv4 address among `ips` (one per family).
fn ipv4_of(ips: &[IpAddr]) -> Option<std::net::Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(ip) => Some(*ip),
        IpAddr::V6(_) => None,
    })
}

/// The IPv6 address among `ips` (one per family).
fn ipv6_of(ips: &[IpAddr]) -> Option<std::net::Ipv6Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V6(ip) => Some(*ip),
        IpAddr::V4(_) => None,
    })
}

/// The interfaces `--turn-kernel-relay` names, with `auto` standing for
/// those that hold the listening address and the relay address: where
/// clients' and peers' packets to them arrive.
fn kernel_relay_interfaces(
    named: &[String],
    listen: IpAddr,
    relay: IpAddr,
) -> anyhow::Result<Vec<String>> {
    let mut interfaces: Vec<String> = Vec::new();
    for name in named {
        let found = if name == "auto" {
            let mut found = Vec::new();
            for ip in [listen, relay] {
                match callisto_turn::net::interface_holding(ip)
                    .context("listing the network interfaces")?
                {
                    Some(interface) => found.push(interface),
                    None => bail!(
                        "--turn-kernel-relay auto: no network interface holds {ip}; name the interface instead"
                    ),
                }
            }
            found
        } else {
            vec![name.clone()]
        };
        for interface in found {
            if !interfaces.contains(&interface) {
                interfaces.push(interface);
            }
        }
    }
    Ok(interfaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_relays_serve_loopback_listeners_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(relays_serve_clients_of(true, ip("127.0.0.1")));
        assert!(relays_serve_clients_of(true, ip("::1")));
        assert!(!relays_serve_clients_of(true, ip("0.0.0.0")));
        assert!(!relays_serve_clients_of(true, ip("192.0.2.1")));
        assert!(relays_serve_clients_of(false, ip("0.0.0.0")));
    }

    #[test]
    fn one_address_per_family() {
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        let both = ips(&["192.0.2.1", "2001:db8::1"]);
        assert_eq!(one_per_family(&both, "--turn-relay-ip").unwrap(), both);
        let err = one_per_family(&ips(&["192.0.2.1", "192.0.2.2"]), "--turn-relay-ip")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--turn-relay-ip takes one address per family"),
            "{err}"
        );
        assert!(one_per_family(&ips(&["::1", "2001:db8::1"]), "--turn-external-ip").is_err());
    }
}
