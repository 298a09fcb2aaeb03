//! Hashes both sides must compute identically (Maglev permutations, client hashing).

/// SplitMix64's finaliser: cheap, loop-free (the verifier likes it), and well mixed.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of a client identity: its network namespace cookie (a pod, in Kubernetes terms) and
/// its address when the socket is already bound (zero otherwise).
#[inline(always)]
pub const fn client_hash(netns_cookie: u64, addr: &[u32; 4]) -> u64 {
    let a =
        ((addr[0] as u64) << 32 | addr[1] as u64) ^ mix64((addr[2] as u64) << 32 | addr[3] as u64);
    mix64(netns_cookie ^ mix64(a))
}
