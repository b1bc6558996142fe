//! A rough throughput figure, not a pass/fail test (so #[ignore]d): 50 MB of output from
//! each decoder, decoding the real PostgreSQL fixtures over and over in TOAST-chunk-sized
//! slices (1996 bytes), the way a backend reading a TOAST table would feed them. Run in
//! release mode:
//! `cargo test --release -p chat_backfill_toast_stream -- --ignored --nocapture`

use chat_backfill_toast_stream::ToastDecoder;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

const TARGET: usize = 50_000_000;
const TOAST_CHUNK: usize = 1996;

fn read(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name),
    )
    .unwrap()
}

fn measure(name: &str) {
    let chunks = read(&format!("{name}.toast"));
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&read(&format!("{name}.json.gz"))[..])
        .read_to_end(&mut text)
        .unwrap();
    let rounds = TARGET.div_ceil(text.len());
    let start = Instant::now();
    let mut total = 0usize;
    for _ in 0..rounds {
        let mut d = ToastDecoder::new();
        let mut sink = |b: &[u8]| total += b.len();
        for slice in chunks.chunks(TOAST_CHUNK) {
            d.feed(slice, &mut sink).unwrap();
        }
        d.finish(&mut sink).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, rounds * text.len());
    println!(
        "{name}: {:.1} MB of output in {secs:.3} s = {:.0} MB/s (compressed input {:.0} MB/s)",
        total as f64 / 1e6,
        total as f64 / 1e6 / secs,
        (rounds * chunks.len()) as f64 / 1e6 / secs
    );
}

#[test]
#[ignore]
fn streaming_decode_throughput() {
    measure("pglz_big");
    measure("lz4_big");
    // For scale: lz4_flex decoding the same block whole, into one buffer.
    let chunks = read("lz4_big.toast");
    let raw = (u32::from_ne_bytes(chunks[..4].try_into().unwrap()) & ((1 << 30) - 1)) as usize;
    let rounds = TARGET.div_ceil(raw);
    let start = Instant::now();
    let mut n = 0;
    for _ in 0..rounds {
        n += lz4_flex::block::decompress(&chunks[4..], raw)
            .unwrap()
            .len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "lz4_flex whole-block (reference): {:.0} MB/s",
        n as f64 / 1e6 / secs
    );
}
