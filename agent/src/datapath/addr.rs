//! Converting socket addresses to and from the maps' four-word form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use switchyard_common::{
    Addr,
    addr::{is_v4_mapped, v4_mapped},
};

pub fn to_words(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

pub fn from_words(words: &Addr) -> IpAddr {
    if is_v4_mapped(words) {
        return IpAddr::V4(Ipv4Addr::from(words[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for ip in ["10.96.0.10", "fd00::1:2", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_words(&to_words(ip)), ip);
        }
        // A v4-mapped IPv6 address is the IPv4 service.
        let mapped: IpAddr = "::ffff:10.96.0.10".parse().unwrap();
        assert_eq!(to_words(mapped), to_words("10.96.0.10".parse().unwrap()));
    }
}
