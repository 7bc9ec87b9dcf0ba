//! Which addresses pushed HTTP and TCP checks may reach.
//!
//! Link-local addresses (169.254.0.0/16, fe80::/10, and IPv4-mapped forms)
//! and cloud metadata endpoints (169.254.169.254, fd00:ec2::254,
//! 168.63.129.16, 100.100.100.200, and names like
//! `metadata.google.internal`) are refused unless `[health]
//! allow_metadata_targets = true`. Names are checked, then resolved, and
//! every resolved address is checked; the check then connects only to the
//! addresses that were checked (the HTTP client resolves through
//! [`GuardedResolver`]), so a name cannot re-resolve to a refused address
//! between the check and the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Host names of cloud metadata services (compared without a final dot,
/// case-insensitively).
pub const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

/// Metadata addresses outside the link-local ranges.
const METADATA_V4: [Ipv4Addr; 2] = [
    // Azure's wire server.
    Ipv4Addr::new(168, 63, 129, 16),
    // Alibaba Cloud.
    Ipv4Addr::new(100, 100, 100, 200),
];
/// AWS's IPv6 instance metadata endpoint.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// A check's target was refused before any connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused_target: {target} is a link-local or cloud metadata address; this agent does not check it (set [health] allow_metadata_targets = true in agent.toml to allow it)")]
pub struct RefusedTarget {
    /// The name or address, as refused.
    pub target: String,
}

/// Whether `ip` is link-local or a metadata endpoint.
pub fn is_refused_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_refused_v4(v4);
            }
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == METADATA_V6
        }
    }
}

fn is_refused_v4(ip: Ipv4Addr) -> bool {
    ip.is_link_local() || METADATA_V4.contains(&ip)
}

/// Whether `host` (a name, or an address with or without IPv6 brackets) is
/// refused before any resolution.
pub fn is_refused_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return is_refused_ip(ip);
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    METADATA_HOSTS.contains(&name.as_str())
}

/// Checks `host` and, after resolution, `addrs`: the addresses to connect
/// to, or the refusal.
pub fn check_resolved(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow: bool,
) -> Result<Vec<SocketAddr>, RefusedTarget> {
    let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
    if allow {
        return Ok(addrs);
    }
    if is_refused_host(host) {
        return Err(RefusedTarget {
            target: host.to_string(),
        });
    }
    if let Some(bad) = addrs.iter().find(|addr| is_refused_ip(addr.ip())) {
        return Err(RefusedTarget {
            target: format!("{host} ({})", bad.ip()),
        });
    }
    Ok(addrs)
}

/// reqwest's resolver for pushed HTTP checks: resolves with the system's
/// resolver and refuses names that are, or resolve to, refused addresses.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow;
        let host = name.as_str().to_string();
        Box::pin(async move {
            if !allow && is_refused_host(&host) {
                return Err(Box::new(RefusedTarget { target: host }) as _);
            }
            let addrs = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|err| Box::new(err) as Box<dyn std::error::Error + Send + Sync>)?;
            let checked = check_resolved(&host, addrs, allow)
                .map_err(|err| Box::new(err) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(checked.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_addresses_and_names_are_refused() {
        for host in [
            "169.254.169.254",
            "169.254.0.1",
            "[fe80::1]",
            "fe80::abcd",
            "[fd00:ec2::254]",
            "::ffff:169.254.169.254",
            "168.63.129.16",
            "100.100.100.200",
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata",
        ] {
            assert!(is_refused_host(host), "{host}");
        }
        for host in [
            "127.0.0.1",
            "10.0.0.1",
            "[::1]",
            "example.com",
            "fd00:ec2::253",
            "metadata.example.com",
        ] {
            assert!(!is_refused_host(host), "{host}");
        }
    }

    #[test]
    fn a_name_resolving_to_a_refused_address_is_refused_unless_allowed() {
        let good: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let bad: SocketAddr = "169.254.169.254:80".parse().unwrap();
        assert_eq!(check_resolved("db", [good], false).unwrap(), vec![good]);
        let err = check_resolved("evil.example", [good, bad], false).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("refused_target: evil.example (169.254.169.254)"));
        assert_eq!(
            check_resolved("evil.example", [bad], true).unwrap(),
            vec![bad]
        );
        assert!(check_resolved("metadata.goog", [good], false).is_err());
    }
}
