//! Real PostgreSQL data: the TOAST chunks of JSON documents a PostgreSQL 15 server
//! compressed with pglz and with lz4 (made by fixtures/make.sh), decoded in all sorts of
//! slice sizes, must give back the documents' text.

mod common;

use chat_backfill_toast_stream::{CompressionMethod, ToastDecoder};
use common::feed_in_slices;
use std::io::Read;
use std::path::PathBuf;

fn fixture(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let chunks = std::fs::read(dir.join(format!("{name}.toast"))).unwrap();
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(dir.join(format!("{name}.json.gz"))).unwrap())
        .read_to_end(&mut text)
        .unwrap();
    (chunks, text)
}

#[test]
fn postgres_values_decode_to_their_text() {
    for (name, method) in [
        ("pglz_big", CompressionMethod::Pglz),
        ("pglz_small", CompressionMethod::Pglz),
        ("lz4_big", CompressionMethod::Lz4),
        ("lz4_small", CompressionMethod::Lz4),
    ] {
        let (chunks, text) = fixture(name);
        // Whole, one byte at a time, TOAST's own chunk size (1996 bytes on 8 kB pages),
        // and a scatter of odd sizes that split tags, tokens and length extensions.
        for sizes in [
            vec![chunks.len()],
            vec![1],
            vec![1996],
            vec![1, 2, 3, 5, 8, 13, 700, 4],
        ] {
            let mut decoder = ToastDecoder::new();
            let out = feed_in_slices(&mut decoder, &chunks, &sizes)
                .unwrap_or_else(|e| panic!("{name} in slices {sizes:?}: {e}"));
            assert_eq!(decoder.tcinfo().unwrap().method, method, "{name}");
            assert_eq!(
                decoder.tcinfo().unwrap().raw_size as usize,
                text.len(),
                "{name}"
            );
            assert!(
                out == text,
                "{name} in slices {sizes:?}: output differs from the text"
            );
        }
        // The value is really compressed, and big enough to have slid the window.
        assert!(chunks.len() < text.len() / 2, "{name}");
    }
}

#[test]
fn truncated_postgres_values_are_errors() {
    for name in ["pglz_small", "lz4_small"] {
        let (chunks, _) = fixture(name);
        for cut in [0, 3, 4, 5, chunks.len() / 2, chunks.len() - 1] {
            let result = feed_in_slices(&mut ToastDecoder::new(), &chunks[..cut], &[7]);
            assert!(result.is_err(), "{name} cut at {cut}");
        }
        // And a byte too many.
        let mut longer = chunks.clone();
        longer.push(0);
        assert!(
            feed_in_slices(&mut ToastDecoder::new(), &longer, &[7]).is_err(),
            "{name}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Each value again, in random slice sizes.
    #[test]
    fn postgres_values_in_random_slices(
        which in 0usize..4,
        sizes in proptest::collection::vec(1usize..5000, 1..30),
    ) {
        let name = ["pglz_big", "pglz_small", "lz4_big", "lz4_small"][which];
        let (chunks, text) = fixture(name);
        let out = feed_in_slices(&mut ToastDecoder::new(), &chunks, &sizes).unwrap();
        proptest::prop_assert!(out == text, "{} in slices {:?}", name, sizes);
    }
}
