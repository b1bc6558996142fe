//! Round trips: bytes compressed by a reference encoder (this crate's test encoders, and
//! lz4_flex as an independent lz4 one) must come back out of the streaming decoders
//! whatever slice sizes the compressed stream arrives in; and no input, however broken,
//! makes a decoder panic or hang.

mod common;

use chat_backfill_toast_stream::{DecodeError, Lz4Decoder, PglzDecoder, ToastDecoder};
use common::{feed_in_slices, lz4_compress, pglz_compress, Stream};
use proptest::prelude::*;

fn pglz_roundtrip(data: &[u8], sizes: &[usize]) -> Result<Vec<u8>, DecodeError> {
    feed_in_slices(
        &mut PglzDecoder::new(data.len() as u64),
        &pglz_compress(data),
        sizes,
    )
}

fn lz4_roundtrip(data: &[u8], compressed: &[u8], sizes: &[usize]) -> Result<Vec<u8>, DecodeError> {
    feed_in_slices(&mut Lz4Decoder::new(data.len() as u64), compressed, sizes)
}

/// Data built to hit the interesting encodings: random bytes, runs of one byte (offset-1
/// overlapping copies, max-length matches), repeats of what came `distance` bytes earlier
/// (at the formats' maximum offsets among others), and text.
/// `data` through the test encoder and through lz4_flex's, each decoded in `sizes` slices;
/// the test encoder's output is valid lz4 by the independent decoder too.
fn lz4_both_encoders(data: &[u8], sizes: &[usize]) -> Result<(), TestCaseError> {
    let ours = lz4_compress(data);
    prop_assert_eq!(&lz4_flex::block::decompress(&ours, data.len()).unwrap(), data);
    prop_assert_eq!(lz4_roundtrip(data, &ours, sizes).unwrap(), data);
    let theirs = lz4_flex::block::compress(data);
    prop_assert_eq!(lz4_roundtrip(data, &theirs, sizes).unwrap(), data);
    Ok(())
}

fn shaped_data() -> impl Strategy<Value = Vec<u8>> {
    #[derive(Debug, Clone)]
    enum Piece {
        Random(Vec<u8>),
        Run(u8, usize),
        Repeat { distance: usize, len: usize },
        Text(usize),
    }
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Piece::Random),
        (any::<u8>(), 1usize..2000).prop_map(|(b, n)| Piece::Run(b, n)),
        (
            prop_oneof![Just(4095usize), Just(65535usize), 1usize..70000],
            1usize..1200
        )
            .prop_map(|(distance, len)| Piece::Repeat { distance, len }),
        (1usize..3000).prop_map(Piece::Text),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| {
        let mut data = Vec::new();
        for p in pieces {
            match p {
                Piece::Random(bytes) => data.extend_from_slice(&bytes),
                Piece::Run(b, n) => data.extend(std::iter::repeat_n(b, n)),
                Piece::Repeat { distance, len } => {
                    // A repeat needs `distance` bytes before it: pad with a pattern first.
                    while data.len() < distance {
                        data.push((data.len() * 31 % 251) as u8);
                    }
                    for _ in 0..len {
                        data.push(data[data.len() - distance]);
                    }
                }
                Piece::Text(n) => {
                    let words = b"the chat message role user assistant content {\"id\": ";
                    for k in 0..n {
                        data.push(words[(k * 7 + n) % words.len()]);
                    }
                }
            }
        }
        data
    })
}

fn slice_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![1usize]),
        proptest::collection::vec(1usize..8, 1..20),
        proptest::collection::vec(1usize..100_000, 1..5),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pglz_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..5000), sizes in slice_sizes()) {
        prop_assert_eq!(pglz_roundtrip(&data, &sizes).unwrap(), data);
    }

    #[test]
    fn pglz_shaped(data in shaped_data(), sizes in slice_sizes()) {
        prop_assert_eq!(pglz_roundtrip(&data, &sizes).unwrap(), data);
    }

    #[test]
    fn lz4_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..5000), sizes in slice_sizes()) {
        lz4_both_encoders(&data, &sizes)?;
    }

    #[test]
    fn lz4_shaped(data in shaped_data(), sizes in slice_sizes()) {
        lz4_both_encoders(&data, &sizes)?;
    }

    /// The header plus stream, as TOAST chunks hold them, through ToastDecoder.
    #[test]
    fn toast_value(data in shaped_data(), lz4 in any::<bool>(), sizes in slice_sizes()) {
        let mut value = Vec::new();
        let method = if lz4 { 1u32 << 30 } else { 0 };
        value.extend_from_slice(&(method | data.len() as u32).to_ne_bytes());
        if lz4 {
            value.extend_from_slice(&lz4_flex::block::compress(&data));
        } else {
            value.extend_from_slice(&pglz_compress(&data));
        }
        prop_assert_eq!(feed_in_slices(&mut ToastDecoder::new(), &value, &sizes).unwrap(), data);
    }

    /// Garbage never panics (nor hangs: the test would time out), and any output that
    /// comes back is at most the declared size.
    #[test]
    fn garbage_never_panics(
        input in proptest::collection::vec(any::<u8>(), 0..3000),
        raw_size in prop_oneof![0u64..100, 0u64..100_000],
        sizes in slice_sizes(),
    ) {
        for out in [
            feed_in_slices(&mut PglzDecoder::new(raw_size), &input, &sizes),
            feed_in_slices(&mut Lz4Decoder::new(raw_size), &input, &sizes),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert_eq!(out.len() as u64, raw_size);
        }
        // The header can declare up to 1 GB; the output can only be what the header says.
        let mut d = ToastDecoder::new();
        if let Ok(out) = feed_in_slices(&mut d, &input, &sizes) {
            prop_assert_eq!(out.len() as u64, d.tcinfo().unwrap().raw_size as u64);
        }
    }

    /// Corrupting one byte of a valid stream gives an error or some output, never a panic;
    /// and the output is never longer than the declared size.
    #[test]
    fn mutated_streams_never_panic(data in shaped_data(), at in any::<prop::sample::Index>(), byte in any::<u8>(), sizes in slice_sizes()) {
        let streams: [(Vec<u8>, bool); 2] = [(pglz_compress(&data), false), (lz4_flex::block::compress(&data), true)];
        for (mut stream, lz4) in streams {
            if stream.is_empty() {
                continue;
            }
            let i = at.index(stream.len());
            stream[i] = byte;
            let mut got = 0u64;
            let result = if lz4 {
                let mut d = Lz4Decoder::new(data.len() as u64);
                run_counting(&mut d, &stream, &sizes, &mut got)
            } else {
                let mut d = PglzDecoder::new(data.len() as u64);
                run_counting(&mut d, &stream, &sizes, &mut got)
            };
            prop_assert!(got <= data.len() as u64);
            if result.is_ok() {
                prop_assert_eq!(got, data.len() as u64);
            }
        }
    }
}

fn run_counting(
    d: &mut impl Stream,
    input: &[u8],
    sizes: &[usize],
    got: &mut u64,
) -> Result<u64, DecodeError> {
    let mut pos = 0;
    let mut k = 0;
    while pos < input.len() {
        let end = (pos + sizes[k % sizes.len()].max(1)).min(input.len());
        d.feed_dyn(&input[pos..end], &mut |b| *got += b.len() as u64)?;
        pos = end;
        k += 1;
    }
    d.finish_dyn(&mut |b| *got += b.len() as u64)
}

#[test]
fn window_sized_repeats_use_max_offsets() {
    // Data that repeats exactly at each window size: the encoders must emit max-offset
    // copies, which the decoders must still reach after their history slid.
    for (window, lz4) in [(4095usize, false), (65535, true)] {
        // Pseudo-random, so the only matches are a whole window back.
        let mut x = 0x2545_f491u32;
        let mut data: Vec<u8> = (0..window)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for _ in 0..3 * window {
            data.push(data[data.len() - window]);
        }
        let out = if lz4 {
            let c = lz4_compress(&data);
            assert!(c.len() < data.len() / 2);
            lz4_roundtrip(&data, &c, &[3, 1, 7000]).unwrap()
        } else {
            let c = pglz_compress(&data);
            assert!(c.len() < data.len() / 2);
            pglz_roundtrip(&data, &[1, 2, 3, 5000]).unwrap()
        };
        assert_eq!(out, data);
    }
}

#[test]
fn long_runs_use_max_length_and_extensions() {
    let data = vec![b'x'; 100_000];
    let p = pglz_compress(&data);
    // 1 literal, then tags of 273: 3 bytes each, plus control bytes.
    assert!(
        p.len() < 100_000 / 273 * 3 + 100_000 / 273 / 8 + 10,
        "{}",
        p.len()
    );
    assert_eq!(pglz_roundtrip(&data, &[1]).unwrap(), data);
    let l = lz4_compress(&data);
    assert!(l.len() < 500, "{}", l.len());
    assert_eq!(lz4_roundtrip(&data, &l, &[1]).unwrap(), data);
}
