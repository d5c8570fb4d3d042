//! GGUF reader/writer and block quantization: round trips, hand-computed blocks, quantization
//! accuracy, garbage input, and bit-exact parity with gguf-py (when its venv is installed).

mod common;

use ferrotune::formats::gguf::quants::{self, GgmlType};
use ferrotune::formats::gguf::{GgufFile, GgufValue, GgufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// splitmix64: deterministic, dependency-free test randomness.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// A random finite f16 bit pattern (any sign, subnormals included).
    fn finite_f16(&mut self) -> u16 {
        loop {
            let b = self.next_u64() as u16;
            if (b >> 10) & 0x1F != 0x1F {
                return b;
            }
        }
    }
    fn finite_bf16(&mut self) -> u16 {
        loop {
            let b = self.next_u64() as u16;
            if (b >> 7) & 0xFF != 0xFF {
                return b;
            }
        }
    }
    fn finite_f32(&mut self) -> f32 {
        loop {
            let v = f32::from_bits(self.next_u64() as u32);
            if v.is_finite() {
                return v;
            }
        }
    }
}

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens `bytes` as a GGUF file and returns the error message; fails if it opened.
fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = write_bytes(dir, name, bytes);
    match GgufFile::open(&p) {
        Ok(_) => panic!("{name}: expected an error, the file opened"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(name),
                "{name}: error does not name the file: {msg}"
            );
            msg
        }
    }
}

fn assert_contains(msg: &str, needle: &str) {
    assert!(
        msg.contains(needle),
        "expected `{needle}` in error message: {msg}"
    );
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ------------------------------------------------------------------------------------------------
// Writer -> reader round trip
// ------------------------------------------------------------------------------------------------

fn sample_metadata() -> Vec<(String, GgufValue)> {
    use GgufValue::*;
    let v = vec![
        ("general.architecture", String("llama".into())),
        ("t.u8", U8(200)),
        ("t.i8", I8(-100)),
        ("t.u16", U16(60_000)),
        ("t.i16", I16(-30_000)),
        ("t.u32", U32(4_000_000_000)),
        ("t.i32", I32(-2_000_000_000)),
        ("t.f32", F32(3.25)),
        ("t.f32_tiny", F32(f32::MIN_POSITIVE / 8.0)),
        ("t.bool_t", Bool(true)),
        ("t.bool_f", Bool(false)),
        ("t.str_empty", String(std::string::String::new())),
        (
            "t.str_utf8",
            String("héllo ✓ 世界 \u{1F600}\n\0tab\t".into()),
        ),
        ("t.u64", U64(u64::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.f64", F64(-1.0e300)),
        ("a.u8", Array(vec![U8(0), U8(255), U8(7)])),
        ("a.i8", Array(vec![I8(-128), I8(127)])),
        ("a.u16", Array(vec![U16(1), U16(65535)])),
        ("a.i16", Array(vec![I16(-1)])),
        ("a.u32", Array(vec![U32(1), U32(2), U32(3)])),
        ("a.i32", Array(vec![I32(-5), I32(5)])),
        ("a.f32", Array(vec![F32(0.5), F32(-0.0), F32(f32::MAX)])),
        ("a.bool", Array(vec![Bool(true), Bool(false), Bool(true)])),
        (
            "a.str",
            Array(vec![
                String("a".into()),
                String(std::string::String::new()),
                String("ü".into()),
            ]),
        ),
        ("a.u64", Array(vec![U64(0), U64(u64::MAX)])),
        ("a.i64", Array(vec![I64(i64::MAX), I64(-1)])),
        ("a.f64", Array(vec![F64(1e-300), F64(2.5)])),
        ("a.empty", Array(vec![])),
        (
            "a.nested",
            Array(vec![
                Array(vec![String("x y".into()), String("z".into())]),
                Array(vec![U32(9)]),
                Array(vec![]),
                Array(vec![Array(vec![F64(1.5), F64(-2.0)])]),
            ]),
        ),
    ];
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// What one test tensor is: name, torch shape, type, and either f32 data (quantized by the
/// writer) or raw block bytes.
struct SampleTensor {
    name: &'static str,
    shape: Vec<usize>,
    ty: GgmlType,
    data: Option<Vec<f32>>,
    bytes: Vec<u8>,
}

fn sample_tensors(rng: &mut Rng) -> Vec<SampleTensor> {
    let f = |name, shape: &[usize], ty, rng: &mut Rng| {
        let n = shape.iter().product();
        let data = rng.normals(n, 1.5);
        let bytes = quants::quantize(ty, &data).unwrap();
        SampleTensor {
            name,
            shape: shape.to_vec(),
            ty,
            data: Some(data),
            bytes,
        }
    };
    let raw = |name, shape: &[usize], ty: GgmlType, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let mut bytes = rng.bytes(ty.bytes_for(n).unwrap());
        // Keep the f16 scales finite so the dequantized values are comparable.
        for block in bytes.chunks_exact_mut(ty.type_size()) {
            block[0..2].copy_from_slice(&f16_bits(0.125));
            block[2..4].copy_from_slice(&f16_bits(-1.0));
        }
        SampleTensor {
            name,
            shape: shape.to_vec(),
            ty,
            data: None,
            bytes,
        }
    };
    vec![
        f("f32.mat", &[3, 5], GgmlType::F32, rng),
        f("f16.vec", &[7], GgmlType::F16, rng),
        f("bf16.mat", &[2, 3], GgmlType::BF16, rng),
        f("q4_0", &[2, 64], GgmlType::Q4_0, rng),
        f("q8_0", &[4, 32], GgmlType::Q8_0, rng),
        f("q5_1", &[64], GgmlType::Q5_1, rng),
        f("q4_k", &[2, 256], GgmlType::Q4K, rng),
        f("q5_k", &[256], GgmlType::Q5K, rng),
        f("q6_k.3d", &[1, 2, 256], GgmlType::Q6K, rng),
        raw("q4_1.raw.4d", &[2, 2, 2, 32], GgmlType::Q4_1, rng),
        f("zero.rows", &[0, 32], GgmlType::Q8_0, rng),
    ]
}

fn build_writer(meta: &[(String, GgufValue)], tensors: &[SampleTensor]) -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k.clone(), v.clone());
    }
    for t in tensors {
        match &t.data {
            Some(d) => w.add_tensor_f32(t.name, &t.shape, d, t.ty).unwrap(),
            None => w
                .add_tensor_raw(t.name, &t.shape, t.ty, t.bytes.clone())
                .unwrap(),
        }
    }
    w
}

fn check_round_trip(alignment: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(alignment.unwrap_or(0) as u64 + 1);
    let mut meta = sample_metadata();
    if let Some(a) = alignment {
        meta.insert(3, ("general.alignment".into(), GgufValue::U32(a)));
    }
    let tensors = sample_tensors(&mut rng);
    let path = dir.path().join("rt.gguf");
    build_writer(&meta, &tensors).write(&path).unwrap();

    let f = GgufFile::open(&path).unwrap();
    let a = alignment.unwrap_or(32) as u64;
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment() as u64, a);
    assert_eq!(
        f.metadata(),
        &meta[..],
        "metadata differs after the round trip"
    );
    assert_eq!(f.data_offset() % a, 0, "data section not aligned");
    assert_eq!(f.tensors().len(), tensors.len());
    let mut expected_offset = 0u64;
    for (info, t) in f.tensors().iter().zip(&tensors) {
        assert_eq!(info.name, t.name);
        assert_eq!(info.ggml_type, t.ty);
        assert_eq!(info.shape(), t.shape);
        let rev: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(
            info.dims, rev,
            "{}: dims are stored innermost first",
            t.name
        );
        assert_eq!(info.n_elements(), t.shape.iter().product::<usize>());
        assert_eq!(info.n_bytes(), t.bytes.len());
        assert_eq!(
            info.offset % a,
            0,
            "{}: offset {} not aligned to {a}",
            t.name,
            info.offset
        );
        assert_eq!(
            info.offset, expected_offset,
            "{}: tensors are packed in order",
            t.name
        );
        expected_offset = (info.offset + t.bytes.len() as u64).next_multiple_of(a);
        assert_eq!(
            f.tensor_bytes(t.name).unwrap(),
            &t.bytes[..],
            "{}: bytes differ",
            t.name
        );
        assert_eq!(f.tensor_info(t.name), Some(info));
        let deq = f.tensor_f32(t.name).unwrap();
        assert_eq!(
            bits(&deq),
            bits(&quants::dequantize(t.ty, &t.bytes, info.n_elements()).unwrap())
        );
        if t.ty == GgmlType::F32 {
            assert_eq!(
                bits(&deq),
                bits(t.data.as_ref().unwrap()),
                "F32 must be stored exactly"
            );
        }
    }
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(file_len, f.data_offset() + expected_offset, "file length");

    // Reading and writing back reproduces the file byte for byte.
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.add_metadata(k.clone(), v.clone());
    }
    for t in f.tensors() {
        w.add_tensor_raw(
            t.name.clone(),
            &t.shape(),
            t.ggml_type,
            f.tensor_bytes(&t.name).unwrap().to_vec(),
        )
        .unwrap();
    }
    let again = dir.path().join("again.gguf");
    w.write(&again).unwrap();
    assert!(
        std::fs::read(&path).unwrap() == std::fs::read(&again).unwrap(),
        "rewrite differs"
    );
}

#[test]
fn round_trip_default_alignment() {
    check_round_trip(None);
}

#[test]
fn round_trip_custom_alignments() {
    for a in [1, 8, 64, 4096] {
        check_round_trip(Some(a));
    }
}

#[test]
fn header_layout_matches_the_spec() {
    // One F32 tensor of 32 values and no metadata: every byte position is known.
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    let data: Vec<f32> = (0..32).map(|i| i as f32).collect();
    w.add_tensor_f32("w", &[32], &data, GgmlType::F32).unwrap();
    let p = dir.path().join("tiny.gguf");
    w.write(&p).unwrap();
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[0..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
    assert_eq!(
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        1,
        "tensor count"
    );
    assert_eq!(
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
        0,
        "kv count"
    );
    assert_eq!(
        u64::from_le_bytes(b[24..32].try_into().unwrap()),
        1,
        "name length"
    );
    assert_eq!(b[32], b'w');
    assert_eq!(
        u32::from_le_bytes(b[33..37].try_into().unwrap()),
        1,
        "n_dims"
    );
    assert_eq!(
        u64::from_le_bytes(b[37..45].try_into().unwrap()),
        32,
        "ne[0]"
    );
    assert_eq!(
        u32::from_le_bytes(b[45..49].try_into().unwrap()),
        0,
        "type F32"
    );
    assert_eq!(
        u64::from_le_bytes(b[49..57].try_into().unwrap()),
        0,
        "offset"
    );
    assert!(b[57..64].iter().all(|&x| x == 0), "header padding");
    assert_eq!(b.len(), 64 + 128);
    assert_eq!(
        f32::from_le_bytes(b[64 + 4 * 31..64 + 128].try_into().unwrap()),
        31.0
    );
}

// ------------------------------------------------------------------------------------------------
// Metadata getters and writer validation
// ------------------------------------------------------------------------------------------------

#[test]
fn metadata_getters_convert_and_explain() {
    use GgufValue::*;
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in [
        ("s", String("hi".into())),
        ("u8", U8(7)),
        ("i32", I32(12)),
        ("neg", I32(-1)),
        ("u64", U64(99)),
        ("big", U64(1 << 40)),
        ("f32", F32(0.5)),
        ("f64", F64(0.25)),
        ("arr", Array(vec![U32(1), U32(2)])),
    ] {
        w.add_metadata(k, v);
    }
    w.add_metadata("s", String("replaced".into())); // replaces in place
    let p = dir.path().join("meta.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.metadata()[0].0, "s");
    assert_eq!(f.get_str("s").unwrap(), "replaced");
    assert_eq!(f.get_u32("u8").unwrap(), 7);
    assert_eq!(f.get_u32("i32").unwrap(), 12);
    assert_eq!(f.get_u32("u64").unwrap(), 99);
    assert_eq!(f.get_f32("f32").unwrap(), 0.5);
    assert_eq!(f.get_f32("f64").unwrap(), 0.25);
    assert_eq!(f.get_array("arr").unwrap(), &[U32(1), U32(2)]);
    assert_eq!(f.get("u8"), Some(&U8(7)));
    assert_eq!(f.get_opt_u32("missing").unwrap(), None);
    assert_eq!(f.get_opt_f32("missing").unwrap(), None);
    assert_eq!(f.get_opt_str("missing").unwrap(), None);
    assert_eq!(f.get_opt_u32("u8").unwrap(), Some(7));
    assert_eq!(f.get_opt_str("s").unwrap(), Some("replaced"));

    let e = |r: ferrotune::Result<()>| -> std::string::String {
        let m = r.unwrap_err().to_string();
        assert_contains(&m, "meta.gguf");
        m
    };
    assert_contains(
        &e(f.get_str("nope").map(|_| ())),
        "metadata key `nope` is missing",
    );
    assert_contains(
        &e(f.get_str("u8").map(|_| ())),
        "metadata key `u8` has type u8, expected string",
    );
    assert_contains(&e(f.get_u32("neg").map(|_| ())), "does not fit");
    assert_contains(&e(f.get_u32("big").map(|_| ())), "does not fit");
    assert_contains(
        &e(f.get_u32("s").map(|_| ())),
        "has type string, expected an integer",
    );
    assert_contains(&e(f.get_f32("u8").map(|_| ())), "has type u8");
    assert_contains(&e(f.get_array("s").map(|_| ())), "expected array");
    assert_contains(&e(f.get_opt_str("u8").map(|_| ())), "expected string");
    assert_contains(&e(f.get_opt_u32("f32").map(|_| ())), "expected an integer");
    assert_contains(&e(f.get_opt_f32("s").map(|_| ())), "has type string");
    assert_contains(
        &e(f.tensor_bytes("ghost").map(|_| ())),
        "no tensor named `ghost`",
    );
    assert_contains(&e(f.tensor_f32("ghost").map(|_| ())), "ghost");

    assert_eq!(U8(3).as_u64(), Some(3));
    assert_eq!(I64(-3).as_u64(), None);
    assert_eq!(I16(-3).as_i64(), Some(-3));
    assert_eq!(F32(1.5).as_f64(), Some(1.5));
    assert_eq!(U32(1).as_f64(), None);
    assert_eq!(String("x".into()).as_str(), Some("x"));
    assert_eq!(Array(vec![]).type_name(), "array");
}

#[test]
fn writer_rejects_invalid_tensors_and_metadata() {
    let mut w = GgufWriter::new();
    let z = vec![0f32; 33 * 2];
    assert_contains(
        &w.add_tensor_f32("a", &[2, 33], &z, GgmlType::Q4_0)
            .unwrap_err(),
        "not a multiple",
    );
    assert_contains(
        &w.add_tensor_f32("a", &[2, 128], &vec![0.0; 256], GgmlType::Q4K)
            .unwrap_err(),
        "not a multiple",
    );
    assert_contains(
        &w.add_tensor_f32("a", &[3, 32], &z, GgmlType::Q8_0)
            .unwrap_err(),
        "holds 96 values",
    );
    assert_contains(
        &w.add_tensor_raw("a", &[32], GgmlType::Q8_0, vec![0; 33])
            .unwrap_err(),
        "take 34 bytes",
    );
    assert_contains(
        &w.add_tensor_raw("a", &[1, 1, 1, 1, 32], GgmlType::F32, vec![0; 128])
            .unwrap_err(),
        "dimensions",
    );
    assert_contains(
        &w.add_tensor_raw("x".repeat(64), &[1], GgmlType::F32, vec![0; 4])
            .unwrap_err(),
        "longer than",
    );
    assert_contains(
        &w.add_tensor_f32("a", &[32], &z[..32], GgmlType::Q2K)
            .unwrap_err(),
        "not a multiple",
    );
    w.add_tensor_raw("a", &[32], GgmlType::Q8_0, vec![0; 34])
        .unwrap();
    assert_contains(
        &w.add_tensor_raw("a", &[32], GgmlType::Q8_0, vec![0; 34])
            .unwrap_err(),
        "already added",
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    let mut mixed = GgufWriter::new();
    mixed.add_metadata(
        "mixed",
        GgufValue::Array(vec![GgufValue::U8(1), GgufValue::I8(1)]),
    );
    let m = mixed.write(&p).unwrap_err().to_string();
    assert_contains(&m, "bad.gguf");
    assert_contains(&m, "metadata key `mixed`");
    for bad in [GgufValue::U32(48), GgufValue::U32(0), GgufValue::U64(64)] {
        let mut w = GgufWriter::new();
        w.add_metadata("general.alignment", bad);
        assert_contains(&w.write(&p).unwrap_err().to_string(), "general.alignment");
    }
    assert!(!p.exists(), "a failed write must not leave a file");
}

// ------------------------------------------------------------------------------------------------
// Dequantization of hand-built blocks
// ------------------------------------------------------------------------------------------------

fn deq(ty: GgmlType, block: &[u8]) -> Vec<f32> {
    assert_eq!(
        block.len(),
        ty.type_size(),
        "{ty}: hand-built block has the wrong size"
    );
    quants::dequantize(ty, block, ty.block_size()).unwrap()
}

#[test]
fn hand_built_q4_1_block() {
    // d = 0.5, m = -1; byte j holds value j (low nibble, = j) and value 16+j (high, = 15-j).
    let mut b = vec![];
    b.extend(f16_bits(0.5));
    b.extend(f16_bits(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected = [
        -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, //
        6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0,
    ];
    assert_eq!(deq(GgmlType::Q4_1, &b), expected);
}

#[test]
fn hand_built_q4_0_block() {
    // d = 2; value = 2 * (nibble - 8).
    let mut b = vec![];
    b.extend(f16_bits(2.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected = [
        -16.0, -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0,
        14.0, //
        14.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0, -10.0, -12.0, -14.0,
        -16.0,
    ];
    assert_eq!(deq(GgmlType::Q4_0, &b), expected);
}

#[test]
fn hand_built_q8_0_block() {
    let mut b = vec![];
    b.extend(f16_bits(0.25));
    let q: [i8; 32] = [
        -128, -1, 0, 1, 127, 5, -6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
        23, 24, 25, 26, 27, 28, 29, 30, -31,
    ];
    b.extend(q.iter().map(|&v| v as u8));
    let y = deq(GgmlType::Q8_0, &b);
    assert_eq!(&y[..8], &[-32.0, -0.25, 0.0, 0.25, 31.75, 1.25, -1.5, 1.75]);
    assert_eq!(y[31], -7.75);
}

#[test]
fn hand_built_q5_blocks() {
    // Q5_0, d = 1: fifth bits set for values 16..31, nibble j for both halves -> -16..15.
    let mut b = vec![];
    b.extend(f16_bits(1.0));
    b.extend(0xFFFF_0000u32.to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let expected: Vec<f32> = (-16..16).map(|v| v as f32).collect();
    assert_eq!(deq(GgmlType::Q5_0, &b), expected);

    // Q5_1, d = 0.5, m = 1: fifth bits for values 0..15; low nibble 15-j, high nibble j.
    let mut b = vec![];
    b.extend(f16_bits(0.5));
    b.extend(f16_bits(1.0));
    b.extend(0x0000_FFFFu32.to_le_bytes());
    b.extend((0..16u8).map(|j| (15 - j) | (j << 4)));
    let y = deq(GgmlType::Q5_1, &b);
    assert_eq!(&y[..3], &[16.5, 16.0, 15.5]); // 0.5 * 31 + 1, 0.5 * 30 + 1, ...
    assert_eq!(y[15], 9.0); // 0.5 * 16 + 1
    assert_eq!(&y[16..19], &[1.0, 1.5, 2.0]);
    assert_eq!(y[31], 8.5);
}

#[test]
fn hand_built_q6_k_block() {
    // d = 0.5, sub-scales g - 8; all quants 0 (value -32) except a few placed by hand.
    let mut b = vec![0u8; 210];
    b[0] = 0x21; // value 0: low bits 1; value 64: low bits 2
    b[128] = 0xE4; // high 2-bit fields of values 0, 32, 64, 96: 0, 1, 2, 3
    b[97] = 0xF3; // second half, byte 32+1: value 161 low bits 3, value 225 low bits 15
    for g in 0..16 {
        b[192 + g] = (g as i8 - 8) as u8;
    }
    b[208..210].copy_from_slice(&f16_bits(0.5));
    let y = deq(GgmlType::Q6K, &b);
    let mut expected: Vec<f32> = (0..256).map(|i| -16.0 * ((i / 16) as f32 - 8.0)).collect();
    expected[0] = 124.0; // (0.5 * -8) * (1 - 32)
    expected[32] = 48.0; // (0.5 * -6) * (16 - 32)
    expected[64] = -4.0; // (0.5 * -4) * (34 - 32)
    expected[96] = -16.0; // (0.5 * -2) * (48 - 32)
    expected[161] = -29.0; // (0.5 * 2) * (3 - 32)
    expected[225] = -51.0; // (0.5 * 6) * (15 - 32)
    assert_eq!(y, expected);
}

/// Scale bytes for sub-block scales [1,2,3,4,5,40,7,8] and mins [0,2,4,6,8,10,12,63], packed
/// by hand: sub-blocks 4..8 put their low 4 bits in bytes 8..12 and their top 2 bits in bits
/// 6..7 of bytes 0..8 (scale 40 = 0b10_1000, min 63 = 0b11_1111).
const K_SCALES: [u8; 12] = [
    0x01, 0x82, 0x03, 0x04, 0x00, 0x02, 0x04, 0xC6, 0x85, 0xA8, 0xC7, 0xF8,
];
const K_SC: [f32; 8] = [1.0, 2.0, 3.0, 4.0, 5.0, 40.0, 7.0, 8.0];
const K_MIN: [f32; 8] = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 63.0];

/// Nibble pattern used by the K-quant blocks: even sub-blocks read l % 16, odd 15 - l % 16.
fn k_nibbles() -> Vec<u8> {
    (0..128)
        .map(|i| ((i % 32) % 16) as u8 | ((15 - (i % 32) % 16) as u8) << 4)
        .collect()
}

#[test]
fn hand_built_q4_k_block() {
    let mut b = vec![];
    b.extend(f16_bits(1.0)); // d
    b.extend(f16_bits(0.5)); // dmin
    b.extend(K_SCALES);
    b.extend(k_nibbles());
    let y = deq(GgmlType::Q4K, &b);
    assert_eq!(y[0], 0.0);
    assert_eq!(y[1], 1.0);
    assert_eq!(y[32], 29.0); // sub 1: 2 * 15 - 0.5 * 2
    assert_eq!(y[128 + 5], 21.0); // sub 4: 5 * 5 - 0.5 * 8
    assert_eq!(y[160 + 3], 475.0); // sub 5: 40 * 12 - 0.5 * 10
    assert_eq!(y[224 + 17], 80.5); // sub 7: 8 * 14 - 0.5 * 63
    for (i, &v) in y.iter().enumerate() {
        let (j, l) = (i / 32, i % 32);
        let q = if j % 2 == 0 { l % 16 } else { 15 - l % 16 } as f32;
        assert_eq!(v, K_SC[j] * q - 0.5 * K_MIN[j], "value {i}");
    }
}

#[test]
fn hand_built_q5_k_block() {
    let mut b = vec![];
    b.extend(f16_bits(1.0));
    b.extend(f16_bits(0.5));
    b.extend(K_SCALES);
    b.extend([0b1010_1010u8; 32]); // fifth bit set in the odd sub-blocks
    b.extend(k_nibbles());
    let y = deq(GgmlType::Q5K, &b);
    assert_eq!(y[0], 0.0);
    assert_eq!(y[32], 61.0); // sub 1: 2 * (15 + 16) - 1
    assert_eq!(y[160 + 3], 1115.0); // sub 5: 40 * (12 + 16) - 5
    for (i, &v) in y.iter().enumerate() {
        let (j, l) = (i / 32, i % 32);
        let q = if j % 2 == 0 { l % 16 } else { 15 - l % 16 + 16 } as f32;
        assert_eq!(v, K_SC[j] * q - 0.5 * K_MIN[j], "value {i}");
    }
}

#[test]
fn hand_built_q3_k_block() {
    // d = 1; every sub-block scale is 33 - 32 = +1 except sub-block 8 (29 - 32 = -3).
    let mut b = vec![0xFFu8; 32]; // hmask: high bit set = no -4 offset
    b[0] = 0xFD; // ...except value 32 (bit 1 of hmask[0])
    let mut qs = [0u8; 64];
    qs[0] = 0xE4; // values 0, 32, 64, 96 -> 0, 1, 2, 3
    qs[32 + 5] = 0x03; // value 133 -> 3
    b.extend(qs);
    let mut scales = [0x11u8; 12];
    scales[8..12].copy_from_slice(&[0xAA; 4]);
    scales[0] = 0xD1; // sub-block 8 low nibble 13 (high nibble of byte 0)
    scales[8] = 0x9A; // sub-block 8 top bits 01 (bits 4..5 of byte 8)
    b.extend(scales);
    b.extend(f16_bits(1.0));
    let y = deq(GgmlType::Q3K, &b);
    let mut expected = vec![0f32; 256];
    expected[32] = -3.0; // 1 * (1 - 4)
    expected[64] = 2.0;
    expected[96] = 3.0;
    expected[133] = -9.0; // -3 * 3
    assert_eq!(y, expected);
}

#[test]
fn hand_built_q2_k_block() {
    // Sub-block i: scale (i+1) & 15, min i % 3; d = 0.5, dmin = 1.
    let mut b: Vec<u8> = (0..16u8)
        .map(|i| ((i + 1) & 0xF) | ((i % 3) << 4))
        .collect();
    let mut qs = [0u8; 64];
    qs[0] = 0xE4; // values 0, 32, 64, 96 -> 0, 1, 2, 3
    qs[32 + 7] = 0xFF; // values 135, 167, 199, 231 -> 3
    b.extend(qs);
    b.extend(f16_bits(0.5));
    b.extend(f16_bits(1.0));
    let y = deq(GgmlType::Q2K, &b);
    assert_eq!(y[0], 0.0);
    assert_eq!(y[20], -1.0); // sub 1: 0 - 1
    assert_eq!(y[32], -0.5); // sub 2: 1.5 * 1 - 2
    assert_eq!(y[64], 4.0); // sub 4: 2.5 * 2 - 1
    assert_eq!(y[96], 10.5); // sub 6: 3.5 * 3 - 0
    assert_eq!(y[135], 11.5); // sub 8: 4.5 * 3 - 2
    assert_eq!(y[231], 20.5); // sub 14: 7.5 * 3 - 2
}

#[test]
fn hand_built_float_elements() {
    assert_eq!(deq(GgmlType::F16, &[0x00, 0x3C]), [1.0]);
    assert_eq!(deq(GgmlType::F16, &[0xFF, 0x7B]), [65504.0]);
    assert_eq!(deq(GgmlType::F16, &[0x01, 0x00]), [2f32.powi(-24)]);
    assert_eq!(deq(GgmlType::BF16, &[0x49, 0x40]), [3.140625]);
    assert_eq!(deq(GgmlType::BF16, &[0x80, 0xBF]), [-1.0]);
    assert_eq!(deq(GgmlType::F32, &1.5f32.to_le_bytes()), [1.5]);
    let mut q8k = vec![0u8; 292];
    q8k[0..4].copy_from_slice(&0.5f32.to_le_bytes());
    q8k[4] = (-3i8) as u8;
    assert_eq!(deq(GgmlType::Q8K, &q8k)[..2], [-1.5, 0.0]);
}

#[test]
fn dequantize_checks_sizes() {
    let e = quants::dequantize(GgmlType::Q4_0, &[0; 18], 31).unwrap_err();
    assert_contains(&e, "not a multiple");
    let e = quants::dequantize(GgmlType::Q4_0, &[0; 17], 32).unwrap_err();
    assert_contains(&e, "18 bytes");
    let e = quants::dequantize(GgmlType::IQ2XXS, &[0; 66], 256).unwrap_err();
    assert_contains(&e, "not supported");
    let mut out = vec![0f32; 64];
    quants::dequantize_into(GgmlType::Q8_0, &[0; 68], &mut out).unwrap();
    assert!(quants::dequantize_into(GgmlType::Q8_0, &[0; 34], &mut out).is_err());
}

// ------------------------------------------------------------------------------------------------
// Quantization accuracy
// ------------------------------------------------------------------------------------------------

/// Test inputs: several distributions, each a whole number of 256-value super-blocks.
fn accuracy_inputs() -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng(42);
    let n = 256 * 8;
    let mut outliers = rng.normals(n, 1.0);
    for i in (0..n).step_by(97) {
        outliers[i] *= 30.0;
    }
    vec![
        ("normal", rng.normals(n, 1.0)),
        ("small", rng.normals(n, 1e-3)),
        ("large", rng.normals(n, 300.0)),
        ("positive", (0..n).map(|_| 2.0 + rng.uniform()).collect()),
        (
            "negative",
            (0..n).map(|_| -5.0 - 3.0 * rng.uniform()).collect(),
        ),
        ("outliers", outliers),
    ]
}

/// Largest error allowed per block, as a fraction of the block's max |x| (`absmax`) or of its
/// range (max - min). Derived from each format's step size plus f16 rounding of the scales.
fn error_bound(ty: GgmlType, block: &[f32]) -> f32 {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (lo, hi) = block
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let range = hi - lo;
    let k_span = hi.max(0.0) - lo.min(0.0);
    let f16_min = lo.abs() * 1e-3; // f16 rounding of a stored minimum
                                   // For tiny data the f16 scales are subnormal: their absolute rounding error (2^-25) times
                                   // the largest factor it is multiplied by.
    let sub = |factor: f32| factor * 2f32.powi(-25);
    let bound = match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => amax * 4.9e-4,
        GgmlType::BF16 => amax * 3.9e-3,
        GgmlType::Q8_0 | GgmlType::Q8_1 => amax * 0.0045, // 0.5 step of amax/127, plus d's rounding
        GgmlType::Q8K => amax * 0.0041,
        GgmlType::Q4_0 => amax * 0.126, // clipped extreme opposite the absmax: one step of amax/8
        GgmlType::Q5_0 => amax * 0.064,
        GgmlType::Q4_1 => range * 0.036 + f16_min,
        GgmlType::Q5_1 => range * 0.018 + f16_min,
        // K-quants: sub-block scales and mins are themselves 6-bit quantized; bounds relative to
        // the 256-value super-block (the brief's "< ~15% of block range" for 4 bits).
        // ggml clamps K-quant mins to <= 0, so the fitted span always includes zero.
        GgmlType::Q4K => k_span * 0.05 + f16_min,
        GgmlType::Q5K => k_span * 0.03 + f16_min,
        GgmlType::Q6K => amax * 0.025,
        _ => unreachable!(),
    };
    let factor = match ty {
        GgmlType::Q8_0 | GgmlType::Q8_1 => 128.0,
        GgmlType::Q4_0 | GgmlType::Q5_0 => 16.0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => 32.0,
        GgmlType::Q4K | GgmlType::Q5K => 64.0 * 33.0,
        GgmlType::Q6K => 128.0 * 32.0,
        _ => 0.0,
    };
    bound + sub(factor)
}

/// Root-mean-square error relative to the input's RMS, the usual quality yardstick.
fn rel_rms(x: &[f32], y: &[f32]) -> f32 {
    let e: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let s: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    (e / s).sqrt() as f32
}

const QUANTIZABLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q8K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

#[test]
fn quantize_then_dequantize_is_close() {
    // Relative RMS error on normal data, per type: ~1.3x what the reference algorithms achieve
    // (measured: Q8_0 0.0054, Q4_0 0.085, Q4_1 0.078, Q5_x 0.04, Q4_K 0.071, Q5_K 0.036, Q6_K 0.018).
    let rms_bound = |ty| match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 3e-4,
        GgmlType::BF16 => 3e-3,
        GgmlType::Q8_0 | GgmlType::Q8_1 => 0.007,
        GgmlType::Q8K => 0.01,
        GgmlType::Q4_0 | GgmlType::Q4_1 => 0.11,
        GgmlType::Q5_0 | GgmlType::Q5_1 => 0.055,
        GgmlType::Q4K => 0.09,
        GgmlType::Q5K => 0.045,
        GgmlType::Q6K => 0.023,
        _ => unreachable!(),
    };
    for ty in QUANTIZABLE {
        assert!(ty.can_quantize() && ty.can_dequantize(), "{ty}");
        for (dist, x) in accuracy_inputs() {
            let q = quants::quantize(ty, &x).unwrap();
            assert_eq!(q.len(), ty.bytes_for(x.len()).unwrap());
            let y = quants::dequantize(ty, &q, x.len()).unwrap();
            let block = error_group(ty);
            for (b, (xs, ys)) in x.chunks(block).zip(y.chunks(block)).enumerate() {
                let bound = error_bound(ty, xs);
                let worst = xs
                    .iter()
                    .zip(ys)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= bound,
                    "{ty} {dist} block {b}: max error {worst} > bound {bound}"
                );
            }
            if dist == "normal" {
                let r = rel_rms(&x, &y);
                assert!(r <= rms_bound(ty), "{ty}: relative RMS error {r}");
            }
        }
    }
}

/// Error bounds for the K-quants are per 256-value super-block; legacy types per block; plain
/// float types per 32 values (any grouping works for them).
fn error_group(ty: GgmlType) -> usize {
    if ty.block_size() == 1 {
        32
    } else {
        ty.block_size()
    }
}

#[test]
fn zero_and_constant_blocks_are_exact() {
    for ty in QUANTIZABLE {
        let zeros = vec![0f32; 512];
        let y = quants::dequantize(ty, &quants::quantize(ty, &zeros).unwrap(), 512).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros do not stay zero");
        // A constant block: exactly representable by every type with a scale (3 = 3 * 1.0).
        let c = vec![-3f32; 512];
        let y = quants::dequantize(ty, &quants::quantize(ty, &c).unwrap(), 512).unwrap();
        let worst = y.iter().map(|v| (v + 3.0).abs()).fold(0f32, f32::max);
        assert!(worst <= 3.0 * 0.01, "{ty}: constant block off by {worst}");
    }
}

#[test]
fn quantize_rejects_partial_blocks_and_unsupported_types() {
    assert_contains(
        &quants::quantize(GgmlType::Q4_0, &[0.0; 33]).unwrap_err(),
        "not a multiple",
    );
    assert_contains(
        &quants::quantize(GgmlType::Q6K, &[0.0; 32]).unwrap_err(),
        "not a multiple",
    );
    assert_contains(
        &quants::quantize(GgmlType::Q2K, &[0.0; 256]).unwrap_err(),
        "not supported",
    );
}

#[test]
fn type_table() {
    let t = |s| GgmlType::from_name(s).unwrap();
    assert_eq!(t("q8_0"), GgmlType::Q8_0);
    assert_eq!(t("Q4_K"), GgmlType::Q4K);
    assert_eq!(t("f16"), GgmlType::F16);
    assert_eq!(t("bf16").to_u32(), 30);
    for (ty, id, bs, ts) in [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 36),
        (GgmlType::Q2K, 10, 256, 84),
        (GgmlType::Q3K, 11, 256, 110),
        (GgmlType::Q4K, 12, 256, 144),
        (GgmlType::Q5K, 13, 256, 176),
        (GgmlType::Q6K, 14, 256, 210),
        (GgmlType::Q8K, 15, 256, 292),
        (GgmlType::BF16, 30, 1, 2),
    ] {
        assert_eq!(
            (ty.to_u32(), ty.block_size(), ty.type_size()),
            (id, bs, ts),
            "{ty}"
        );
        assert_eq!(GgmlType::from_u32(id), Some(ty));
    }
    assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
    assert_eq!(GgmlType::from_u32(4), None);
    assert_eq!(GgmlType::from_name("q9_9"), None);
}

// ------------------------------------------------------------------------------------------------
// Garbage input
// ------------------------------------------------------------------------------------------------

/// A small valid file with metadata (incl. nested arrays) and three tensors.
fn valid_file() -> (Vec<u8>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_metadata(
        "tok.list",
        GgufValue::Array(vec![GgufValue::String("ab".into()); 5]),
    );
    w.add_metadata(
        "nest",
        GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::I16(1)])]),
    );
    w.add_tensor_f32("a", &[2, 8], &rng.normals(16, 1.0), GgmlType::F32)
        .unwrap();
    w.add_tensor_f32("b", &[2, 32], &rng.normals(64, 1.0), GgmlType::Q8_0)
        .unwrap();
    w.add_tensor_f32("c", &[256], &rng.normals(256, 1.0), GgmlType::Q4K)
        .unwrap();
    let p = dir.path().join("v.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let last = f.tensors().last().unwrap();
    let data_end = f.data_offset() + last.offset + last.n_bytes() as u64;
    (std::fs::read(&p).unwrap(), data_end)
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let (bytes, data_end) = valid_file();
    let dir = tempfile::tempdir().unwrap();
    let mut cuts: Vec<usize> = (0..400.min(data_end as usize)).collect();
    cuts.extend((400..data_end as usize).step_by(7));
    cuts.push(data_end as usize - 1);
    for len in cuts {
        let msg = open_err(dir.path(), "cut.gguf", &bytes[..len]);
        if len > 0 && len < 24 {
            assert_contains(&msg, "truncated");
        }
    }
    // Cutting only the final tensor's padding leaves a complete file.
    for len in data_end as usize..=bytes.len() {
        let p = write_bytes(dir.path(), "pad.gguf", &bytes[..len]);
        GgufFile::open(&p).unwrap();
    }
    assert_contains(&open_err(dir.path(), "empty.gguf", &[]), "empty");
    let missing = dir.path().join("missing.gguf");
    assert_contains(
        &GgufFile::open(&missing).unwrap_err().to_string(),
        "missing.gguf",
    );
}

/// A file with no metadata and one F32 tensor `w` of 32 values, whose header fields sit at
/// known positions: n_dims 33, ne[0] 37, type 45, offset 49.
fn tiny_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.add_tensor_f32("w", &[32], &[1.0; 32], GgmlType::F32)
        .unwrap();
    let p = dir.path().join("t.gguf");
    w.write(&p).unwrap();
    std::fs::read(p).unwrap()
}

fn patched(mut b: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
    b[at..at + with.len()].copy_from_slice(with);
    b
}

#[test]
fn corrupt_headers_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = tiny_file();
    assert!(GgufFile::open(&write_bytes(d, "ok.gguf", &t)).is_ok());
    assert_contains(
        &open_err(d, "magic.gguf", &patched(t.clone(), 0, b"GGML")),
        "bad magic",
    );
    assert_contains(
        &open_err(d, "v1.gguf", &patched(t.clone(), 4, &1u32.to_le_bytes())),
        "version 1",
    );
    assert_contains(
        &open_err(d, "v99.gguf", &patched(t.clone(), 4, &99u32.to_le_bytes())),
        "version 99",
    );
    assert_contains(
        &open_err(d, "be.gguf", &patched(t.clone(), 4, &3u32.to_be_bytes())),
        "big-endian",
    );
    let m = open_err(
        d,
        "tc.gguf",
        &patched(t.clone(), 8, &u64::MAX.to_le_bytes()),
    );
    assert_contains(&m, "tensor count");
    let m = open_err(
        d,
        "kc.gguf",
        &patched(t.clone(), 16, &(1u64 << 40).to_le_bytes()),
    );
    assert_contains(&m, "metadata entry count");
    let m = open_err(d, "nd.gguf", &patched(t.clone(), 33, &9u32.to_le_bytes()));
    assert_contains(&m, "9 dimensions");
    let m = open_err(d, "ty.gguf", &patched(t.clone(), 45, &77u32.to_le_bytes()));
    assert_contains(&m, "unknown ggml type id 77 for tensor `w`");
    let m = open_err(
        d,
        "off.gguf",
        &patched(t.clone(), 49, &1024u64.to_le_bytes()),
    );
    assert_contains(&m, "extends past the end of the file");
    let m = open_err(
        d,
        "offmax.gguf",
        &patched(t.clone(), 49, &(u64::MAX - 31).to_le_bytes()),
    );
    assert_contains(&m, "extends past the end");
    let m = open_err(
        d,
        "misal.gguf",
        &patched(t.clone(), 49, &4u64.to_le_bytes()),
    );
    assert_contains(&m, "not a multiple of the alignment 32");
    let m = open_err(
        d,
        "dim.gguf",
        &patched(t.clone(), 37, &(1u64 << 62).to_le_bytes()),
    );
    assert!(m.contains("absurd") || m.contains("past the end"), "{m}");
    let m = open_err(
        d,
        "row.gguf",
        &patched(
            patched(t.clone(), 45, &8u32.to_le_bytes()),
            37,
            &16u64.to_le_bytes(),
        ),
    );
    assert_contains(
        &m,
        "row length 16 is not a multiple of the Q8_0 block size 32",
    );
    let m = open_err(
        d,
        "name.gguf",
        &patched(t.clone(), 24, &(1u64 << 50).to_le_bytes()),
    );
    assert_contains(&m, "name of tensor 0");
    let m = open_err(d, "utf8.gguf", &patched(t.clone(), 32, &[0xFF]));
    assert_contains(&m, "UTF-8");
}

/// Writes a file with the given metadata through the writer, then lets `patch` edit its bytes.
fn meta_file(meta: &[(&str, GgufValue)], patch: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(*k, v.clone());
    }
    w.add_tensor_f32("w", &[32], &[0.5; 32], GgmlType::F32)
        .unwrap();
    let p = dir.path().join("m.gguf");
    w.write(&p).unwrap();
    let mut b = std::fs::read(p).unwrap();
    patch(&mut b);
    b
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn corrupt_metadata_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Value of general.alignment follows the key and its u32 type id.
    let b = meta_file(&[("general.alignment", GgufValue::U32(32))], |b| {
        let at = find(b, b"general.alignment") + 17 + 4;
        b[at..at + 4].copy_from_slice(&48u32.to_le_bytes());
    });
    assert_contains(
        &open_err(d, "al.gguf", &b),
        "general.alignment must be a u32 power of two",
    );
    let b = meta_file(
        &[("k.aa", GgufValue::U8(1)), ("k.ab", GgufValue::U8(2))],
        |b| {
            let at = find(b, b"k.ab");
            b[at..at + 4].copy_from_slice(b"k.aa");
        },
    );
    assert_contains(
        &open_err(d, "dup.gguf", &b),
        "metadata key `k.aa` appears twice",
    );
    let b = meta_file(&[("k.t", GgufValue::U8(1))], |b| {
        let at = find(b, b"k.t") + 3;
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    assert_contains(
        &open_err(d, "vt.gguf", &b),
        "metadata key `k.t`: unknown value type 99",
    );
    let b = meta_file(
        &[("k.arr", GgufValue::Array(vec![GgufValue::U32(1); 4]))],
        |b| {
            let at = find(b, b"k.arr") + 5 + 4 + 4; // array length
            b[at..at + 8].copy_from_slice(&(1u64 << 61).to_le_bytes());
        },
    );
    assert_contains(&open_err(d, "al2.gguf", &b), "array length");
    let b = meta_file(
        &[("k.arr", GgufValue::Array(vec![GgufValue::U32(1); 4]))],
        |b| {
            let at = find(b, b"k.arr") + 5 + 4; // element type
            b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
        },
    );
    assert_contains(&open_err(d, "et.gguf", &b), "unknown array element type 13");

    // Arrays nested 100 deep: rejected, not a stack overflow.
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'k');
    b.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend([0u8; 64]);
    assert_contains(&open_err(d, "deep.gguf", &b), "nested");

    // Two tensors with the same name.
    let dir2 = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.add_tensor_f32("x1", &[32], &[0.5; 32], GgmlType::F32)
        .unwrap();
    w.add_tensor_f32("x2", &[32], &[0.5; 32], GgmlType::F32)
        .unwrap();
    let p = dir2.path().join("two.gguf");
    w.write(&p).unwrap();
    let mut b = std::fs::read(p).unwrap();
    let at = find(&b, b"x2");
    b[at..at + 2].copy_from_slice(b"x1");
    assert_contains(&open_err(d, "dupt.gguf", &b), "tensor `x1` appears twice");
}

#[test]
fn random_corruption_never_panics() {
    let (base, data_end) = valid_file();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.gguf");
    let mut rng = Rng(99);
    let (mut opened, mut failed) = (0, 0);
    for _ in 0..1500 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the header, where the structure is.
            let limit = if rng.below(8) == 0 {
                b.len()
            } else {
                (data_end as usize).min(300)
            };
            let at = rng.below(limit);
            b[at] = match rng.below(3) {
                0 => rng.next_u64() as u8,
                1 => b[at] ^ (1 << rng.below(8)),
                _ => 0xFF,
            };
        }
        if rng.below(4) == 0 {
            b.truncate(rng.below(b.len() + 1));
        }
        std::fs::write(&p, &b).unwrap();
        match GgufFile::open(&p) {
            Ok(f) => {
                opened += 1;
                for t in f.tensors() {
                    let _ = f.tensor_f32(&t.name);
                }
            }
            Err(e) => {
                failed += 1;
                assert_contains(&e.to_string(), "fuzz.gguf");
            }
        }
    }
    assert!(
        opened > 0 && failed > 0,
        "fuzzing exercised only one outcome ({opened} ok, {failed} errors)"
    );
}

// ------------------------------------------------------------------------------------------------
// Bit-exact parity with gguf-py (skipped when its venv is absent)
// ------------------------------------------------------------------------------------------------

/// Dumps, for a GGUF file, a JSON summary (metadata without the `GGUF.*` pseudo-fields, and
/// tensor infos) plus the float32 bytes of `gguf.quants.dequantize` for the requested tensors
/// (`{name: rows}`, 0 rows = all; `null` = every tensor). In `quant` mode, quantizes a raw f32
/// file (rows of 256) with `gguf.quants.quantize` for each named type.
const PARITY_PY: &str = r#"
import sys, json
import numpy as np
import gguf
from gguf.quants import dequantize, quantize

def plain(v, t):
    # Floats travel as IEEE bit patterns: exact, whatever the JSON parser does with decimals.
    if t == int(gguf.GGUFValueType.FLOAT32):
        return {"f32bits": int(np.array(v, dtype=np.float32).view(np.uint32))}
    if t == int(gguf.GGUFValueType.FLOAT64):
        return {"f64bits": int(np.array(v, dtype=np.float64).view(np.uint64))}
    return v.item() if isinstance(v, np.generic) else v

def describe(reader):
    meta = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [int(t) for t in f.types]
        e = {"types": types}
        if types and types[0] == int(gguf.GGUFValueType.ARRAY):
            e["len"] = len(f.data)
            if len(types) == 2:
                e["head"] = [plain(x, types[1]) for x in f.contents(slice(0, 5))]
        else:
            e["value"] = plain(f.contents(), types[0])
        meta[name] = e
    tensors = [{"name": t.name, "type": int(t.tensor_type), "dims": [int(d) for d in t.shape],
                "data_offset": int(t.data_offset)} for t in reader.tensors]
    return {"metadata": meta, "tensors": tensors}

mode = sys.argv[1]
if mode == "deq":
    path, out, want = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        if want is not None and t.name not in want:
            continue
        rows = want[t.name] if want is not None else 0
        data = t.data[:rows] if rows else t.data
        y = dequantize(data, t.tensor_type)
        np.ascontiguousarray(y, dtype="<f4").tofile(f"{out}/{t.name}.f32")
    with open(f"{out}/summary.json", "w") as fh:
        json.dump(describe(r), fh)
elif mode == "quant":
    src, out = sys.argv[2], sys.argv[3]
    x = np.fromfile(src, dtype="<f4").reshape(-1, 256)
    for name in sys.argv[4].split(","):
        q = quantize(x, gguf.GGMLQuantizationType[name])
        np.ascontiguousarray(q).tofile(f"{out}/{name}.q")
"#;

/// A Python with gguf-py and numpy: the PyTorch peers' venv, or the one `.ci/run` makes; the
/// first of them that imports both.
fn gguf_python() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut why = Vec::new();
    for py in [root.join(".peers/venv/bin/python"), root.join(".ci-venv/bin/python")] {
        if !py.exists() {
            why.push(format!("{} does not exist", py.display()));
            continue;
        }
        match Command::new(&py).args(["-c", "import gguf, numpy"]).output() {
            Ok(out) if out.status.success() => return Ok(py),
            Ok(out) => why.push(format!("{} cannot import gguf: {}", py.display(), String::from_utf8_lossy(&out.stderr).trim())),
            Err(e) => why.push(format!("cannot run {}: {e}", py.display())),
        }
    }
    Err(format!("{} (`.ci/run` makes the second)", why.join("; ")))
}

/// Runs the parity script; once the interpreter is known to work, any failure is a test
/// failure (it means gguf-py rejected our file or the script broke).
fn run_parity_py(py: &Path, dir: &Path, args: &[&str]) {
    let script = dir.join("parity.py");
    std::fs::write(&script, PARITY_PY).unwrap();
    let out = Command::new(py).arg(&script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "gguf-py script failed ({:?}):\n{}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_f32_file(p: &Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn assert_bits_equal(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
        panic!(
            "{what}: element {i} differs: ours {:e} ({:#010x}), gguf-py {:e} ({:#010x})",
            ours[i],
            ours[i].to_bits(),
            theirs[i],
            theirs[i].to_bits()
        );
    }
}

/// Whether a metadata value equals the JSON gguf-py produced for it.
fn json_matches(v: &GgufValue, j: &serde_json::Value) -> bool {
    match v {
        GgufValue::String(s) => j.as_str() == Some(s.as_str()),
        GgufValue::Bool(b) => j.as_bool() == Some(*b),
        GgufValue::F32(x) => j["f32bits"].as_u64() == Some(x.to_bits() as u64),
        GgufValue::F64(x) => j["f64bits"].as_u64() == Some(x.to_bits()),
        GgufValue::Array(_) => false,
        int => match (int.as_i64(), int.as_u64()) {
            (Some(i), _) if j.as_i64() == Some(i) => true,
            (_, Some(u)) => j.as_u64() == Some(u),
            _ => false,
        },
    }
}

/// Checks our reading of `f` against gguf-py's summary: every key (type, scalar value, array
/// length and first items) and every tensor (type, dims, absolute data offset).
fn compare_summary(f: &GgufFile, summary: &serde_json::Value) {
    let meta = summary["metadata"].as_object().unwrap();
    assert_eq!(meta.len(), f.metadata().len(), "metadata key counts differ");
    for (k, v) in f.metadata() {
        let e = &meta
            .get(k)
            .unwrap_or_else(|| panic!("gguf-py lacks key {k}"));
        assert_eq!(
            e["types"][0].as_u64(),
            Some(v.type_id() as u64),
            "{k}: type"
        );
        match v {
            GgufValue::Array(items) => {
                assert_eq!(
                    e["len"].as_u64(),
                    Some(items.len() as u64),
                    "{k}: array length"
                );
                if let Some(head) = e.get("head").and_then(|h| h.as_array()) {
                    assert_eq!(head.len(), items.len().min(5), "{k}: head");
                    for (i, (a, b)) in items.iter().zip(head).enumerate() {
                        assert!(json_matches(a, b), "{k}[{i}]: ours {a:?}, gguf-py {b}");
                    }
                }
            }
            _ => assert!(
                json_matches(v, &e["value"]),
                "{k}: ours {v:?}, gguf-py {}",
                e["value"]
            ),
        }
    }
    let tensors = summary["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors().len(), "tensor counts differ");
    for (t, j) in f.tensors().iter().zip(tensors) {
        assert_eq!(j["name"].as_str(), Some(t.name.as_str()));
        assert_eq!(
            j["type"].as_u64(),
            Some(t.ggml_type.to_u32() as u64),
            "{}: type",
            t.name
        );
        let dims: Vec<u64> = j["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(dims, t.dims, "{}: dims", t.name);
        assert_eq!(
            j["data_offset"].as_u64(),
            Some(f.data_offset() + t.offset),
            "{}: data offset",
            t.name
        );
    }
}

fn read_summary(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

/// Random block bytes with every f16/bf16/f32 field replaced by a random *finite* value (NaN
/// payloads are not part of the contract); the quant bits stay fully random.
fn random_blocks(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut b = rng.bytes(ty.bytes_for(n).unwrap());
    let f16_fields: &[usize] = match ty {
        GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    };
    for block in b.chunks_exact_mut(ty.type_size()) {
        for &at in f16_fields {
            block[at..at + 2].copy_from_slice(&rng.finite_f16().to_le_bytes());
        }
        match ty {
            GgmlType::BF16 => block.copy_from_slice(&rng.finite_bf16().to_le_bytes()),
            GgmlType::F32 => block.copy_from_slice(&rng.finite_f32().to_le_bytes()),
            _ => {}
        }
    }
    b
}

/// Types gguf-py 0.19 can dequantize and we promise parity for.
const PARITY_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

#[test]
fn gguf_py_parity_dequantize_random_blocks() {
    let py = match gguf_python() {
        Ok(p) => p,
        Err(reason) => return common::skipped("gguf-py parity", &reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(2024);
    let mut w = GgufWriter::new();
    let mut meta = sample_metadata();
    meta.retain(|(k, _)| k != "a.nested"); // gguf-py's reader does not decode nested arrays
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    let mut names = vec![];
    for ty in PARITY_TYPES {
        let shape: &[usize] = match ty.block_size() {
            1 => &[5, 7],
            32 => &[4, 96],
            _ => &[3, 512],
        };
        let n = shape.iter().product();
        let name = format!("rand.{}", ty.name());
        w.add_tensor_raw(name.clone(), shape, ty, random_blocks(ty, n, &mut rng))
            .unwrap();
        names.push(name);
        if ty.can_quantize() {
            // Blocks as our quantizer makes them, i.e. the realistic ones.
            let name = format!("ours.{}", ty.name());
            w.add_tensor_f32(name.clone(), shape, &rng.normals(n, 0.7), ty)
                .unwrap();
            names.push(name);
        }
    }
    let path = dir.path().join("parity.gguf");
    w.write(&path).unwrap();
    run_parity_py(
        &py,
        dir.path(),
        &[
            "deq",
            path.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            "null",
        ],
    );

    let f = GgufFile::open(&path).unwrap();
    compare_summary(&f, &read_summary(dir.path()));
    for name in &names {
        let theirs = read_f32_file(&dir.path().join(format!("{name}.f32")));
        assert_bits_equal(name, &f.tensor_f32(name).unwrap(), &theirs);
    }
    println!("gguf-py parity: {} tensors bit-identical", names.len());
}

#[test]
fn gguf_py_parity_quantize_legacy_types() {
    let py = match gguf_python() {
        Ok(p) => p,
        Err(reason) => return common::skipped("gguf-py parity", &reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    let mut x = rng.normals(256 * 12, 1.0);
    x.extend((0..256).map(|_| rng.uniform() * 5.0 - 1.0));
    x.extend([0.0f32; 256]);
    x.extend([-2.5f32; 256]);
    // Edge values: beyond f16 range, f16 subnormals, exact ties, signed zeros.
    x.extend((0..256).map(|i| match i % 8 {
        0 => 70000.0,
        1 => -1e-7,
        2 => 3e-6,
        3 => 0.5,
        4 => -0.0,
        5 => 1.0 + (i as f32) / 1024.0,
        6 => -100.0,
        _ => rng.normal(),
    }));
    let src = dir.path().join("x.f32");
    std::fs::write(
        &src,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    let list: Vec<&str> = types.iter().map(|t| t.name()).collect();
    run_parity_py(
        &py,
        dir.path(),
        &[
            "quant",
            src.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            &list.join(","),
        ],
    );
    for ty in types {
        let theirs = std::fs::read(dir.path().join(format!("{}.q", ty.name()))).unwrap();
        let ours = quants::quantize(ty, &x).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ty}: lengths");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
            let blk = i / ty.type_size();
            panic!(
                "{ty}: byte {i} (block {blk}) differs: ours {:#04x}, gguf-py {:#04x}",
                ours[i], theirs[i]
            );
        }
    }
    println!("gguf-py parity: quantize output identical for {list:?}");
}

#[test]
fn real_model_matches_gguf_py() {
    let Some(model) = common::smollm2_gguf() else {
        return common::skipped("real_model_matches_gguf_py", "SmolLM2 GGUF not found");
    };
    let f = GgufFile::open(&model).unwrap();
    assert!(!f.tensors().is_empty());
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let py = match gguf_python() {
        Ok(p) => p,
        Err(reason) => {
            return common::skipped("real_model_matches_gguf_py", &format!("model opened, {} tensors; {reason}", f.tensors().len()))
        }
    };
    // One tensor of each type the file has (Q4_1, Q8_0, F32), Q8_0 limited to its first rows.
    let pick = |ty| {
        f.tensors()
            .iter()
            .find(|t| t.ggml_type == ty)
            .unwrap_or_else(|| panic!("no {ty} tensor"))
    };
    let chosen = [
        (pick(GgmlType::Q4_1), 0usize),
        (pick(GgmlType::Q8_0), 64),
        (pick(GgmlType::F32), 0),
    ];
    let want: serde_json::Map<String, serde_json::Value> = chosen
        .iter()
        .map(|(t, rows)| (t.name.clone(), serde_json::json!(rows)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let want = serde_json::Value::Object(want).to_string();
    run_parity_py(
        &py,
        dir.path(),
        &[
            "deq",
            model.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            &want,
        ],
    );
    compare_summary(&f, &read_summary(dir.path()));
    for (t, rows) in chosen {
        let ours = if rows == 0 {
            f.tensor_f32(&t.name).unwrap()
        } else {
            let row_len = t.dims[0] as usize;
            let row_bytes = t.ggml_type.bytes_for(row_len).unwrap();
            let bytes = &f.tensor_bytes(&t.name).unwrap()[..rows * row_bytes];
            quants::dequantize(t.ggml_type, bytes, rows * row_len).unwrap()
        };
        let theirs = read_f32_file(&dir.path().join(format!("{}.f32", t.name)));
        assert_bits_equal(&t.name, &ours, &theirs);
        println!(
            "{} ({}, {} values): bit-identical to gguf-py",
            t.name,
            t.ggml_type,
            ours.len()
        );
    }
}
