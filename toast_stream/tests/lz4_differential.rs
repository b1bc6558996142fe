//! Differential check against liblz4, the decoder PostgreSQL links: cases written by
//! scripts/lz4_differential.py (valid, mutated and hand-shaped blocks, with
//! LZ4_decompress_safe's verdict and output) must never be accepted here when liblz4
//! rejects them, and must decode to liblz4's output when both accept. The allowed
//! differences are the two ways this decoder is stricter: offset 0, and blocks breaking
//! the format's end-of-block rules (liblz4's fast shortcut skips those checks). Needs
//! the cases file, so it is #[ignore]d:
//! `python3 toast_stream/scripts/lz4_differential.py /tmp/cases.bin 60000`
//! `LZ4_DIFFERENTIAL_CASES=/tmp/cases.bin cargo test -p chat_backfill_toast_stream --test lz4_differential -- --ignored --nocapture`

mod common;

use chat_backfill_toast_stream::{DecodeError, Lz4Decoder};
use common::feed_in_slices;

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

#[test]
#[ignore]
fn agrees_with_liblz4() {
    // Skipped, not failed, without the cases, so `-- --ignored` runs the rest anyway.
    let Ok(path) = std::env::var("LZ4_DIFFERENTIAL_CASES") else {
        println!("LZ4_DIFFERENTIAL_CASES is not set: skipped (see the module comment)");
        return;
    };
    let cases = std::fs::read(path).unwrap();
    let (mut pos, mut n, mut agreed_ok, mut agreed_err) = (0, 0, 0, 0);
    let (mut offset0, mut end_rules) = (0, 0);
    let mut disagreements = Vec::new();
    while pos < cases.len() {
        let raw = u32_at(&cases, pos);
        let block_len = u32_at(&cases, pos + 4);
        let ok = cases[pos + 8] == 1;
        let out_len = u32_at(&cases, pos + 9);
        pos += 13;
        let block = &cases[pos..pos + block_len];
        pos += block_len;
        let expect = &cases[pos..pos + out_len];
        pos += out_len;
        let sizes = [1 + n % 7, 1996, 3];
        let ours = feed_in_slices(&mut Lz4Decoder::new(raw as u64), block, &sizes);
        match (&ours, ok) {
            (Ok(out), true) if out == expect => agreed_ok += 1,
            (Err(_), false) => agreed_err += 1,
            // Offset 0 is invalid by the format; liblz4 copies from the byte it writes.
            (Err(DecodeError::BadOffset { offset: 0, .. }), true) => offset0 += 1,
            (Err(DecodeError::Lz4EndOfBlock), true) => end_rules += 1,
            _ => disagreements.push((n, raw, ok, ours.map(|o| o.len()))),
        }
        n += 1;
    }
    println!(
        "{n} cases: {agreed_ok} both decode identically, {agreed_err} both reject, \
         {offset0} liblz4 accepts offset 0 and we reject, {end_rules} liblz4 accepts \
         breaking the end-of-block rules and we reject, {} disagree",
        disagreements.len()
    );
    for d in disagreements.iter().take(20) {
        println!(
            "  case {} raw {} liblz4 ok {} ours {:?}",
            d.0, d.1, d.2, d.3
        );
    }
    assert!(disagreements.is_empty());
}
