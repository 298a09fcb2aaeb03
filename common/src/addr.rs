//! One address type for both families.

/// An address as the 16 raw bytes of an IPv6 address, held in four words exactly as
/// `bpf_sock_addr.user_ip6` presents them (each word is 4 address bytes in network order, read
/// natively). IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so one service table serves both
/// families and a dual-stack socket's `connect(::ffff:a.b.c.d)` finds the IPv4 service.
pub type Addr = [u32; 4];

/// Word 2 of a v4-mapped address: the bytes `00 00 ff ff`.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `ip4` is the raw word (`bpf_sock_addr.user_ip4`, or `u32::from_ne_bytes(octets)`).
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_PREFIX, ip4]
}

#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX
}
