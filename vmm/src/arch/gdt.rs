//! The boot GDT (null, 64-bit code, data, TSS) and the KVM segment descriptors made from it.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry.
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code (long mode), data, TSS.
pub const TABLE: [u64; 4] = [
    entry(0, 0, 0),
    entry(0xa09b, 0, 0xfffff),
    entry(0xc093, 0, 0xfffff),
    entry(0x808b, 0, 0xfffff),
];

/// The KVM segment for GDT entry `index`.
pub fn segment(index: u8) -> kvm_segment {
    let e = TABLE[usize::from(index)];
    let g = ((e >> 55) & 1) as u8;
    let mut limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0x00ff_ffff) | (((e >> 56) & 0xff) << 24),
        limit,
        selector: u16::from(index) * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let cs = segment(1);
        assert_eq!(cs.selector, 8);
        assert_eq!((cs.l, cs.present, cs.dpl, cs.s, cs.g), (1, 1, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2);
        assert_eq!((ds.selector, ds.db, ds.l, ds.type_), (16, 1, 0, 3));
        assert_eq!(segment(0).unusable, 1);
    }
}
