//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each backend walks its own permutation of the table and claims the next free entry, in turns;
//! a backend of weight `w` takes `w` turns per round. Removing one of N backends reassigns only
//! the entries it held (about 1/N of clients), which is why both the kernel and the forwarder
//! use it for sticky balancing. No allocation: callers pass the table and a scratch array.

use crate::hash::mix64;

/// Marks a table entry not yet claimed while building.
pub const EMPTY: u32 = u32::MAX;

/// Fills `table` with indexes into `keys`.
///
/// `keys[i]` is a stable identity of backend `i` (see [`backend_key`]) so the table depends on
/// which backends exist, not on their order of arrival; `weights[i]` is its weight (0 skips
/// it); `next` is scratch of the same length as `keys`. The table size should be prime. Returns
/// `false` (and leaves the table all [`EMPTY`]) when no backend has a weight.
pub fn populate(table: &mut [u32], keys: &[u64], weights: &[u32], next: &mut [u64]) -> bool {
    table.fill(EMPTY);
    let m = table.len() as u64;
    if m == 0 || keys.len() != weights.len() || next.len() < keys.len() {
        return false;
    }
    if weights.iter().all(|&w| w == 0) {
        return false;
    }
    next[..keys.len()].fill(0);
    let mut filled = 0u64;
    loop {
        for (i, &key) in keys.iter().enumerate() {
            let offset = mix64(key) % m;
            let skip = mix64(key ^ 0x9e37_79b9_7f4a_7c15) % (m - 1).max(1) + 1;
            for _ in 0..weights[i] {
                // Walk this backend's permutation to its next free entry.
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != EMPTY {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return true;
                }
            }
        }
    }
}

/// A backend's identity for Maglev: its address and port, so a backend keeps its entries
/// whatever else changes.
pub fn backend_key(addr: &[u32; 4], port: u16) -> u64 {
    let hi = (addr[0] as u64) << 32 | addr[1] as u64;
    let lo = (addr[2] as u64) << 32 | addr[3] as u64;
    mix64(mix64(hi) ^ lo ^ (port as u64) << 17)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = 4093;

    fn build(keys: &[u64], weights: &[u32]) -> [u32; M] {
        let mut table = [0u32; M];
        let mut next = [0u64; 64];
        assert!(populate(&mut table, keys, weights, &mut next));
        table
    }

    fn keys() -> [u64; 16] {
        core::array::from_fn(|i| backend_key(&[0, 0, 0, i as u32 + 1], 80))
    }

    #[test]
    fn shares_are_even_for_equal_weights() {
        let k = keys();
        let table = build(&k[..5], &[1; 5]);
        let mut counts = [0usize; 5];
        table.iter().for_each(|&i| counts[i as usize] += 1);
        for c in counts {
            assert!(c.abs_diff(M / 5) <= M / 50, "{counts:?}");
        }
    }

    #[test]
    fn weights_shape_shares() {
        let k = keys();
        let table = build(&k[..2], &[1, 3]);
        let ones = table.iter().filter(|&&i| i == 1).count();
        assert!(ones.abs_diff(M * 3 / 4) <= M / 50, "{ones}");
    }

    #[test]
    fn removing_one_backend_moves_about_its_share() {
        let k = keys();
        let before = build(&k[..10], &[1; 10]);
        // Drop backend 3: the survivors keep their identities (keys), only their indexes shift.
        let survivors: [u64; 9] = core::array::from_fn(|i| if i < 3 { k[i] } else { k[i + 1] });
        let after = build(&survivors, &[1; 9]);
        let moved = (0..M)
            .filter(|&e| {
                let old = k[before[e] as usize];
                let new = survivors[after[e] as usize];
                old != new
            })
            .count();
        // Backend 3 held about 1/10; Maglev may move a little more.
        assert!(moved < M * 15 / 100, "moved {moved} of {M}");
    }
}
