//! Client identity: who a request counts against. This module owns [`IdentityConfig`] (which
//! headers name the user, the API key and the tier, and which peers are trusted proxies), the
//! rightmost-untrusted walk over `X-Forwarded-For` ([`client_ip`]), and [`Identity`], the
//! borrowed result that fills the identity fields of a [`Request`] (DESIGN §8).
//!
//! # How a request flows through here
//!
//! The HTTP layer has the socket peer and the header list. [`Identity::extract`] asks
//! [`client_ip`] for the address: the peer itself unless the peer is a trusted proxy, and then
//! the first address, reading `X-Forwarded-For` from the right, that is not a trusted proxy.
//! It takes the user id, API key and tier from their configured headers as slices of the
//! header values. [`Identity::fill`] renders the address into an [`IpText`] on the caller's
//! stack and returns the [`Request`] the matcher consumes. Nothing on this path allocates.
//!
//! # What this trusts, and what it cannot check
//!
//! Why read `X-Forwarded-For` from the right: a client can send the header with anything in
//! it, and each proxy appends the address it saw. Only entries appended by proxies we trust
//! carry information, and those are at the right end. So we walk leftwards over trusted
//! proxies and stop at the first address that is not one: that is the address our outermost
//! trusted proxy saw. An entry we cannot parse also stops the walk, and the last trusted hop
//! (the entry to its right, or the peer) is the answer: we never trust what lies beyond a
//! malformed entry. The RFC 7239 `Forwarded` header is not read.
//!
//! The user id, API key and tier headers are taken as they arrive: this module cannot tell a
//! header the client sent from one an authentication layer set. A deployment that keys limits
//! by user id must put something in front of the agent that strips client-sent copies of those
//! headers and sets its own.
//!
//! Addresses are returned in canonical form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`,
//! as a dual-stack socket reports IPv4 peers) becomes the IPv4 address, so one client has one
//! key whichever way it connected. IPv6 clients are keyed by their full address; a client
//! that owns a /64 can rotate through it, and grouping by prefix is not done here.

use std::{
    fmt,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use shared::{Request, wire::MAX_KEY_LEN};

/// Where the agent finds a request's identity: the headers that name the user, the API key and
/// the tier, and the peers whose `X-Forwarded-For` it believes.
///
/// Header names are compared ignoring ASCII case. Build one with [`IdentityConfig::default`]
/// and set what differs; the list of trusted proxies comes from
/// [`IdentityConfig::parse_trusted_proxies`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The header carrying the authenticated user id. Defaults to `x-user-id`.
    pub user_id_header: String,
    /// The header carrying the client's API key. Defaults to `x-api-key`.
    pub api_key_header: String,
    /// The header carrying the client's tier (`free`, `pro`, ...). Defaults to `x-tier`.
    pub tier_header: String,
    /// The proxies whose `X-Forwarded-For` entries are believed. Defaults to empty: the header
    /// is never read and the socket peer is the client.
    ///
    /// **WARNING**: list only your own proxies. A block wider than them (`0.0.0.0/0`, a whole
    /// cloud range) lets any client in it choose the address it is limited by.
    pub trusted_proxies: Vec<Cidr>,
}

/// Default of [`IdentityConfig::user_id_header`].
pub const DEFAULT_USER_ID_HEADER: &str = "x-user-id";
/// Default of [`IdentityConfig::api_key_header`].
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// Default of [`IdentityConfig::tier_header`].
pub const DEFAULT_TIER_HEADER: &str = "x-tier";

impl Default for IdentityConfig {
    fn default() -> IdentityConfig {
        IdentityConfig {
            user_id_header: DEFAULT_USER_ID_HEADER.to_owned(),
            api_key_header: DEFAULT_API_KEY_HEADER.to_owned(),
            tier_header: DEFAULT_TIER_HEADER.to_owned(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl IdentityConfig {
    /// Parses a trusted-proxy list as written in a config file: each entry an address
    /// (`192.168.1.7`, `::1`, meaning just that host) or a CIDR block (`10.0.0.0/8`,
    /// `fd00::/8`). Surrounding whitespace is ignored.
    ///
    /// # Errors
    ///
    /// The first entry that is not an address or a block, or a block with bits set past its
    /// prefix, located by its index in the list. We refuse `10.0.0.1/8` rather than read it as
    /// `10.0.0.0/8` because we cannot tell whether one host or the whole block was meant, and
    /// guessing wide would trust sixteen million addresses.
    pub fn parse_trusted_proxies<S: AsRef<str>>(
        entries: impl IntoIterator<Item = S>,
    ) -> Result<Vec<Cidr>, IdentityError> {
        entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let value = entry.as_ref();
                Cidr::parse(value).map_err(|problem| problem.at(index, value))
            })
            .collect()
    }

    /// Whether `ip` is in one of [`trusted_proxies`](IdentityConfig::trusted_proxies). An
    /// IPv4-mapped IPv6 address is matched as the IPv4 address it maps.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|block| block.contains(ip))
    }
}

/// Why a trusted-proxy list was refused, located by the entry's index. Prints as, for example,
/// `trusted_proxies[2]: "10.0.0.0/33" is not an IP address or CIDR block`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The entry is not an address, and not an address followed by `/` and a prefix length
    /// that fits it (at most 32 for IPv4, 128 for IPv6).
    #[error("trusted_proxies[{index}]: {value:?} is not an IP address or CIDR block")]
    NotAnAddress {
        /// The entry's position in the list, from 0.
        index: usize,
        /// The entry as written.
        value: String,
    },
    /// The entry is a block whose address has bits set past the prefix length.
    #[error(
        "trusted_proxies[{index}]: {value:?} has bits set past its prefix; did you mean {network}?"
    )]
    HostBitsSet {
        /// The entry's position in the list, from 0.
        index: usize,
        /// The entry as written.
        value: String,
        /// The block the prefix length describes, with those bits cleared.
        network: Cidr,
    },
}

impl IdentityError {
    /// The position of the offending entry in the list, from 0.
    pub fn index(&self) -> usize {
        match self {
            IdentityError::NotAnAddress { index, .. }
            | IdentityError::HostBitsSet { index, .. } => *index,
        }
    }
}

/// A block of IP addresses: an address and a prefix length, with no bits set past the prefix.
/// Displays as `10.0.0.0/8`.
///
/// An IPv6 block that covers `::ffff:0:0/96` also covers the IPv4 addresses mapped there, so
/// `::ffff:10.0.0.0/104` contains `10.0.0.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The block of `prefix_len` leading bits of `addr`, or `None` when `prefix_len` is longer
    /// than the address (32 bits for IPv4, 128 for IPv6) or `addr` has bits set past it.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let block = Cidr { addr, prefix_len };
        (prefix_len <= max_prefix_len(addr) && block.network() == addr).then_some(block)
    }

    /// The block's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The number of leading bits the block fixes.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in the block; see the type's doc for IPv4-mapped addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip.to_canonical()) {
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (_, ip) => ip,
        };
        Cidr { addr: ip, ..*self }.network() == self.addr
    }

    fn parse(text: &str) -> Result<Cidr, Problem> {
        let text = text.trim_ascii();
        let (addr, prefix_len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr).map_err(|_| Problem::NotAnAddress)?;
        let max = max_prefix_len(addr);
        let prefix_len = match prefix_len {
            None => max,
            Some(len) => parse_prefix_len(len, max).ok_or(Problem::NotAnAddress)?,
        };
        let network = Cidr { addr, prefix_len }.network();
        if network != addr {
            return Err(Problem::HostBitsSet(Cidr {
                addr: network,
                prefix_len,
            }));
        }
        Ok(Cidr { addr, prefix_len })
    }

    /// `addr` with the bits past the prefix cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & mask))
            }
        }
    }
}

impl From<IpAddr> for Cidr {
    /// The block holding only `addr`.
    fn from(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix_len: max_prefix_len(addr),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The client address of a request that arrived from `peer` with `headers`, in canonical form
/// (an IPv4-mapped address becomes IPv4).
///
/// `peer` itself, unless it is a trusted proxy. Then every `X-Forwarded-For` line is read, in
/// order, as one comma-separated list, from the right: trusted proxies are skipped and the
/// first other address is the answer. If every entry is a trusted proxy, the leftmost one is.
/// An entry that is not an address (`IP`, `IPv4:port`, `[IPv6]` or `[IPv6]:port`, the port
/// ignored) ends the walk, and the last trusted hop is the answer: the entry to its right, or
/// the peer. A line that is empty or all whitespace holds no entries; an empty entry inside a
/// line (`a,,b`) is malformed, because it stands where a trusted hop should have written the
/// address it saw.
pub fn client_ip(config: &IdentityConfig, peer: IpAddr, headers: &[(&str, &str)]) -> IpAddr {
    let peer = peer.to_canonical();
    if !config.is_trusted_proxy(peer) {
        return peer;
    }
    let entries = headers
        .iter()
        .rev()
        .filter(|(name, value)| {
            name.eq_ignore_ascii_case(X_FORWARDED_FOR) && !value.trim_ascii().is_empty()
        })
        .flat_map(|(_, value)| value.rsplit(','));
    let mut last_trusted = peer;
    for entry in entries {
        let Some(hop) = parse_forwarded_entry(entry) else {
            return last_trusted;
        };
        if !config.is_trusted_proxy(hop) {
            return hop;
        }
        last_trusted = hop;
    }
    last_trusted
}

/// Who a request counts against, borrowed from its headers.
///
/// Each of `user_id`, `api_key` and `tier` is the value of the first occurrence of its header
/// that is not blank, with surrounding whitespace trimmed, or `None`. If that value is longer
/// than [`MAX_KEY_LEN`] (256) bytes it is `None` too, and a later occurrence is not consulted:
/// keys travel to the regional with that cap, and cutting a value short could merge two
/// clients into one counter. A rule keyed by user id or API key then counts the request by its
/// IP, as the matcher does for any request without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The client address, from [`client_ip`].
    pub ip: IpAddr,
    /// The user id from [`IdentityConfig::user_id_header`].
    pub user_id: Option<&'a str>,
    /// The API key from [`IdentityConfig::api_key_header`].
    pub api_key: Option<&'a str>,
    /// The tier from [`IdentityConfig::tier_header`].
    pub tier: Option<&'a str>,
}

impl<'a> Identity<'a> {
    /// Reads the identity of a request that arrived from `peer` with `headers` (names compared
    /// ignoring ASCII case). Does not allocate.
    pub fn extract(
        config: &IdentityConfig,
        peer: IpAddr,
        headers: &[(&'a str, &'a str)],
    ) -> Identity<'a> {
        Identity {
            ip: client_ip(config, peer, headers),
            user_id: identity_header(headers, &config.user_id_header),
            api_key: identity_header(headers, &config.api_key_header),
            tier: identity_header(headers, &config.tier_header),
        }
    }

    /// `request` with its `ip`, `user_id`, `api_key` and `tier` replaced by this identity's; the
    /// address is rendered into `ip_text`, which the returned request borrows.
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use edge_agent::{Identity, IdentityConfig, IpText, Request};
    ///
    /// let config = IdentityConfig {
    ///     trusted_proxies: IdentityConfig::parse_trusted_proxies(["10.0.0.0/8"])?,
    ///     ..IdentityConfig::default()
    /// };
    /// let peer: IpAddr = "10.1.2.3".parse()?; // our load balancer
    /// let headers = [("X-Forwarded-For", "198.51.100.9"), ("x-user-id", "u-42")];
    /// let identity = Identity::extract(&config, peer, &headers);
    /// let mut ip_text = IpText::default();
    /// let base = Request { headers: &headers, ..Request::new("GET", "/api/search") };
    /// let request = identity.fill(base, &mut ip_text);
    /// assert_eq!(request.ip, Some("198.51.100.9"));
    /// assert_eq!(request.user_id, Some("u-42"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fill<'b>(&self, request: Request<'b>, ip_text: &'b mut IpText) -> Request<'b>
    where
        'a: 'b,
    {
        *ip_text = IpText::new(self.ip);
        let ip_text: &'b IpText = ip_text;
        Request {
            ip: Some(ip_text.as_str()),
            user_id: self.user_id,
            api_key: self.api_key,
            tier: self.tier,
            ..request
        }
    }
}

/// An IP address as text, on the stack: what [`Request::ip`] borrows without an allocation.
/// The default is the empty string.
#[derive(Clone, Copy)]
pub struct IpText {
    buf: [u8; IP_TEXT_MAX_LEN],
    len: usize,
}

impl IpText {
    /// `ip` rendered as [`IpAddr`]'s `Display` does: `203.0.113.7`, `2001:db8::1`.
    pub fn new(ip: IpAddr) -> IpText {
        let mut text = IpText::default();
        match ip {
            // By hand: the formatter's machinery costs 1% of the edge's CPU under load, and
            // four decimal octets are simple.
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(_) => {
                let mut rest = &mut text.buf[..];
                write!(rest, "{ip}").expect("an IP address renders in at most 45 bytes");
                text.len = IP_TEXT_MAX_LEN - rest.len();
            }
        }
        text
    }

    /// Appends one ASCII byte; an IPv4 address is at most 15 of them.
    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("only a formatted IpAddr is stored")
    }
}

impl Default for IpText {
    fn default() -> IpText {
        IpText {
            buf: [0; IP_TEXT_MAX_LEN],
            len: 0,
        }
    }
}

impl fmt::Debug for IpText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for IpText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one trusted-proxy entry failed, before [`Problem::at`] locates it.
enum Problem {
    NotAnAddress,
    HostBitsSet(Cidr),
}

impl Problem {
    fn at(self, index: usize, value: &str) -> IdentityError {
        let value = value.to_owned();
        match self {
            Problem::NotAnAddress => IdentityError::NotAnAddress { index, value },
            Problem::HostBitsSet(network) => IdentityError::HostBitsSet {
                index,
                value,
                network,
            },
        }
    }
}

/// A prefix length in decimal digits only (`u8::from_str` would take `+8`), at most `max`.
fn parse_prefix_len(text: &str, max: u8) -> Option<u8> {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&len| len <= max)
}

fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// One `X-Forwarded-For` entry as an address, canonical; `None` unless it is `IP`,
/// `IPv4:port`, `[IPv6]` or `[IPv6]:port`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_ascii();
    let ip = if let Ok(ip) = IpAddr::from_str(entry) {
        ip
    } else if let Ok(addr) = SocketAddr::from_str(entry) {
        addr.ip()
    } else {
        let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
        IpAddr::V6(Ipv6Addr::from_str(inner).ok()?)
    };
    Some(ip.to_canonical())
}

/// The first non-blank value of header `name`, trimmed, unless it is over the key cap.
fn identity_header<'a>(headers: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    let value = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim_ascii())
        .find(|v| !v.is_empty())?;
    (value.len() <= MAX_KEY_LEN).then_some(value)
}

/// The header trusted proxies name the client in, as hyper spells header names.
pub(crate) const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The longest text form of an IP address: `INET6_ADDRSTRLEN` without the NUL, as in
/// `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`. Rust's own rendering is at most 39 bytes.
const IP_TEXT_MAX_LEN: usize = 45;

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn config(proxies: &[&str]) -> IdentityConfig {
        IdentityConfig {
            trusted_proxies: IdentityConfig::parse_trusted_proxies(proxies).unwrap(),
            ..IdentityConfig::default()
        }
    }

    fn xff(value: &str) -> [(&str, &str); 1] {
        [("x-forwarded-for", value)]
    }

    #[test]
    fn defaults_trust_no_proxy() {
        let config = IdentityConfig::default();
        assert_eq!(config.user_id_header, "x-user-id");
        assert_eq!(config.api_key_header, "x-api-key");
        assert_eq!(config.tier_header, "x-tier");
        assert!(config.trusted_proxies.is_empty());
        let headers = xff("198.51.100.1");
        assert_eq!(client_ip(&config, ip("10.0.0.1"), &headers), ip("10.0.0.1"));
    }

    #[test]
    fn untrusted_peer_with_spoofed_forwarded_for_is_the_client() {
        let config = config(&["10.0.0.0/8"]);
        let headers = xff("198.51.100.1, 10.0.0.2");
        assert_eq!(
            client_ip(&config, ip("203.0.113.7"), &headers),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn trusted_peer_gives_the_client_from_forwarded_for() {
        let config = config(&["10.0.0.1"]);
        let headers = xff("203.0.113.7");
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn trusted_peer_without_forwarded_for_is_the_client() {
        let config = config(&["10.0.0.1"]);
        assert_eq!(client_ip(&config, ip("10.0.0.1"), &[]), ip("10.0.0.1"));
        let blank = xff("  ");
        assert_eq!(client_ip(&config, ip("10.0.0.1"), &blank), ip("10.0.0.1"));
    }

    #[test]
    fn trusted_hops_are_skipped() {
        let config = config(&["10.0.0.0/8", "192.168.1.7"]);
        let headers = xff("203.0.113.7, 192.168.1.7, 10.1.2.3");
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn all_trusted_gives_the_leftmost() {
        let config = config(&["10.0.0.0/8"]);
        let headers = xff("10.9.9.9, 10.1.1.1,10.2.2.2");
        assert_eq!(client_ip(&config, ip("10.0.0.1"), &headers), ip("10.9.9.9"));
    }

    #[test]
    fn spoofed_prefix_is_ignored() {
        let config = config(&["10.0.0.1"]);
        let headers = xff("evil, 1.1.1.1, 203.0.113.7");
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
        let headers = xff("evil, 203.0.113.7");
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn header_lines_are_one_list_in_order() {
        let config = config(&["10.0.0.0/8"]);
        let headers = [
            ("X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
            ("accept", "*/*"),
            ("x-forwarded-for", "10.0.0.3"),
            ("x-forwarded-for", ""),
            ("X-FORWARDED-FOR", "10.0.0.2"),
        ];
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
        let headers = [
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ];
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn malformed_entry_stops_the_walk_at_the_last_trusted_hop() {
        let config = config(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        for (value, want) in [
            ("garbage", "10.0.0.1"),
            ("203.0.113.7, unknown", "10.0.0.1"),
            ("203.0.113.7, 10.0.0.2, _hidden", "10.0.0.1"),
            ("203.0.113.7, nonsense, 10.0.0.2", "10.0.0.2"),
            ("203.0.113.7,, 10.0.0.2", "10.0.0.2"),
            ("203.0.113.7, 10.0.0.2,", "10.0.0.1"),
            (", 10.0.0.2", "10.0.0.2"),
            ("203.0.113.7, 10.0.0.2:http", "10.0.0.1"),
            ("203.0.113.7, 10.0.0.2:80:81", "10.0.0.1"),
            ("203.0.113.7, 300.0.0.1", "10.0.0.1"),
            ("203.0.113.7, 10.0.0.2/8", "10.0.0.1"),
            ("203.0.113.7, [10.0.0.2]:80", "10.0.0.1"),
            ("203.0.113.7, ::1]:80", "10.0.0.1"),
            ("203.0.113.7, [::1", "10.0.0.1"),
            ("203.0.113.7, 10.0.0.2 10.0.0.3", "10.0.0.1"),
            ("203.0.113.7, \u{feff}10.0.0.2", "10.0.0.1"),
        ] {
            let headers = xff(value);
            assert_eq!(client_ip(&config, peer, &headers), ip(want), "{value:?}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        let config = config(&["10.0.0.0/8", "fd00::/8"]);
        let peer = ip("10.0.0.1");
        for (value, want) in [
            ("203.0.113.7:54321", "203.0.113.7"),
            ("203.0.113.7, 10.0.0.2:443", "203.0.113.7"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("2001:db8::7, [fd00::2]:8080", "2001:db8::7"),
            ("[::ffff:203.0.113.7]:80", "203.0.113.7"),
        ] {
            let headers = xff(value);
            assert_eq!(client_ip(&config, peer, &headers), ip(want), "{value:?}");
        }
    }

    #[test]
    fn ipv6_peers_and_hops() {
        let config = config(&["::1/128", "fd00::/8"]);
        let headers = xff("2001:db8::7, fd12:3456::1");
        assert_eq!(client_ip(&config, ip("::1"), &headers), ip("2001:db8::7"));
        assert_eq!(
            client_ip(&config, ip("fdff::9"), &headers),
            ip("2001:db8::7")
        );
        assert_eq!(client_ip(&config, ip("fe80::1"), &headers), ip("fe80::1"));
        let mixed = xff("203.0.113.7, fd00::2");
        assert_eq!(client_ip(&config, ip("::1"), &mixed), ip("203.0.113.7"));
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_blocks() {
        let config = config(&["10.0.0.0/8"]);
        let headers = xff("::ffff:10.0.0.9, 203.0.113.7");
        assert_eq!(
            client_ip(&config, ip("::ffff:10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
        let headers = xff("::ffff:203.0.113.7, ::ffff:10.0.0.9");
        assert_eq!(
            client_ip(&config, ip("::ffff:10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
        // An untrusted mapped peer is returned as the IPv4 address it maps.
        assert_eq!(
            client_ip(&config, ip("::ffff:203.0.113.8"), &[]),
            ip("203.0.113.8")
        );
        // And a mapped IPv6 block matches a plain IPv4 peer.
        let config = IdentityConfig {
            trusted_proxies: IdentityConfig::parse_trusted_proxies(["::ffff:10.0.0.0/104"])
                .unwrap(),
            ..IdentityConfig::default()
        };
        let headers = xff("203.0.113.7");
        assert_eq!(
            client_ip(&config, ip("10.0.0.1"), &headers),
            ip("203.0.113.7")
        );
        assert_eq!(client_ip(&config, ip("11.0.0.1"), &headers), ip("11.0.0.1"));
    }

    #[test]
    fn cidr_containment_at_the_edges() {
        let block = |text: &str| Cidr::parse(text).ok().unwrap();
        assert!(block("10.0.0.0/8").contains(ip("10.255.255.255")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.0")));
        assert!(block("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(!block("0.0.0.0/0").contains(ip("::1")));
        assert!(block("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!block("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(block("::/0").contains(ip("2001:db8::1")));
        assert!(block("fd00::/8").contains(ip("fdff:ffff::1")));
        assert!(!block("fd00::/8").contains(ip("fe00::1")));
        assert!(!block("fd00::/8").contains(ip("10.0.0.1")));
        assert!(block("::1/128").contains(ip("::1")));
        assert!(!block("::1/128").contains(ip("::2")));
        assert_eq!(block(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
        assert_eq!(block("::1").to_string(), "::1/128");
        assert_eq!(Cidr::new(ip("10.0.0.0"), 8), Some(block("10.0.0.0/8")));
        assert_eq!(Cidr::new(ip("10.0.0.1"), 8), None);
        assert_eq!(Cidr::new(ip("10.0.0.0"), 33), None);
        assert_eq!(Cidr::from(ip("fd00::1")).prefix_len(), 128);
    }

    #[test]
    fn proxy_list_parses_addresses_and_blocks() {
        let list = IdentityConfig::parse_trusted_proxies([
            "10.0.0.0/8",
            "192.168.1.7",
            "::1/128",
            "fd00::/8",
        ])
        .unwrap();
        let shown: Vec<String> = list.iter().map(Cidr::to_string).collect();
        assert_eq!(
            shown,
            ["10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8"]
        );
        let owned = vec![String::from("10.0.0.1")];
        assert_eq!(
            IdentityConfig::parse_trusted_proxies(&owned).unwrap().len(),
            1
        );
    }

    #[test]
    fn proxy_list_error_is_located() {
        let err = IdentityConfig::parse_trusted_proxies(["10.0.0.0/8", "::1", "10.0.0.0/33"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"trusted_proxies[2]: "10.0.0.0/33" is not an IP address or CIDR block"#
        );
        assert_eq!(err.index(), 2);
        for bad in [
            "",
            "garbage",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0.0/256",
            "fd00::/129",
            "10.0.0.0:80",
            "[::1]",
            "10.0.0",
            "fe80::1%eth0",
        ] {
            let err = IdentityConfig::parse_trusted_proxies([bad]).unwrap_err();
            assert!(
                matches!(err, IdentityError::NotAnAddress { index: 0, .. }),
                "{bad:?}"
            );
        }
        let err = IdentityConfig::parse_trusted_proxies(["10.0.0.1/8"]).unwrap_err();
        let want = concat!(
            r#"trusted_proxies[0]: "10.0.0.1/8" has bits set past its prefix; "#,
            "did you mean 10.0.0.0/8?",
        );
        assert_eq!(err.to_string(), want);
        let err = IdentityConfig::parse_trusted_proxies(["fd00::1/8"]).unwrap_err();
        assert!(err.to_string().ends_with("did you mean fd00::/8?"), "{err}");
    }

    #[test]
    fn identity_headers_ignore_case_and_are_trimmed() {
        let config = IdentityConfig::default();
        let headers = [
            ("X-User-Id", "  u-42\t"),
            ("X-API-KEY", "k-1"),
            ("x-Tier", "pro"),
        ];
        let identity = Identity::extract(&config, ip("203.0.113.7"), &headers);
        assert_eq!(
            identity,
            Identity {
                ip: ip("203.0.113.7"),
                user_id: Some("u-42"),
                api_key: Some("k-1"),
                tier: Some("pro"),
            }
        );
        let custom = IdentityConfig {
            user_id_header: "X-Auth-User".into(),
            ..config
        };
        let headers = [("x-auth-user", "u-7"), ("x-user-id", "u-42")];
        let identity = Identity::extract(&custom, ip("203.0.113.7"), &headers);
        assert_eq!(identity.user_id, Some("u-7"));
    }

    #[test]
    fn blank_and_missing_values_are_none() {
        let config = IdentityConfig::default();
        let headers = [("x-user-id", ""), ("x-api-key", "  \t "), ("accept", "*/*")];
        let identity = Identity::extract(&config, ip("203.0.113.7"), &headers);
        assert_eq!(
            (identity.user_id, identity.api_key, identity.tier),
            (None, None, None)
        );
        // A blank occurrence does not hide a later one with a value.
        let headers = [
            ("x-user-id", " "),
            ("x-user-id", "u-42"),
            ("x-user-id", "u-43"),
        ];
        let identity = Identity::extract(&config, ip("203.0.113.7"), &headers);
        assert_eq!(identity.user_id, Some("u-42"));
    }

    #[test]
    fn values_over_the_key_cap_are_none() {
        let config = IdentityConfig::default();
        let at_cap = "k".repeat(MAX_KEY_LEN);
        let over = "k".repeat(MAX_KEY_LEN + 1);
        let padded = format!("  {at_cap}  ");
        let headers = [("x-api-key", padded.as_str()), ("x-user-id", over.as_str())];
        let identity = Identity::extract(&config, ip("203.0.113.7"), &headers);
        assert_eq!(identity.api_key, Some(at_cap.as_str()));
        assert_eq!(identity.user_id, None);
        // The over-long value is not skipped in favour of a later, shorter one.
        let headers = [("x-user-id", over.as_str()), ("x-user-id", "u-42")];
        assert_eq!(
            Identity::extract(&config, ip("203.0.113.7"), &headers).user_id,
            None
        );
    }

    #[test]
    fn identity_fills_a_request() {
        let config = config(&["10.0.0.1"]);
        let headers = [
            ("x-forwarded-for", "2001:db8::7"),
            ("x-user-id", "u-42"),
            ("x-tier", "free"),
        ];
        let identity = Identity::extract(&config, ip("10.0.0.1"), &headers);
        let mut ip_text = IpText::default();
        let base = Request {
            user_id: Some("stale"),
            headers: &headers,
            ..Request::new("GET", "/api/orders")
        };
        let request = identity.fill(base, &mut ip_text);
        assert_eq!(request.ip, Some("2001:db8::7"));
        assert_eq!(request.user_id, Some("u-42"));
        assert_eq!(request.api_key, None);
        assert_eq!(request.tier, Some("free"));
        assert_eq!((request.method, request.path), ("GET", "/api/orders"));
        assert_eq!(request.header("X-Tier"), Some("free"));
    }

    #[test]
    fn ip_text_renders_every_form() {
        assert_eq!(IpText::default().as_str(), "");
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            assert_eq!(IpText::new(ip(text)).as_str(), text);
        }
        assert_eq!(format!("{:?}", IpText::new(ip("::1"))), r#""::1""#);
        // IPv4 is rendered by hand: every octet value, in every position, as Display has it.
        for octet in 0..=255u8 {
            for v4 in [
                Ipv4Addr::new(octet, 0, 7, 255),
                Ipv4Addr::new(10, octet, 99, 100),
                Ipv4Addr::new(1, 2, octet, 3),
                Ipv4Addr::new(192, 168, 1, octet),
            ] {
                assert_eq!(IpText::new(IpAddr::V4(v4)).as_str(), v4.to_string());
            }
        }
    }
}
