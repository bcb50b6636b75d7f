//! Writes seed corpora for the fuzz targets into `fuzz/corpus/TARGET/`:
//! real encoded batches, acks and status messages (plain and sealed with
//! the fuzzers' key), every site file in the repository plus generic-meter
//! site files, and the RTU request frames of every built-in profile's
//! reads. Seeds are generated rather than committed so they follow the
//! code. Existing files are overwritten, others left alone.
//!
//! Usage: `cargo run --example seed [-- CORPUS_DIR]` (default: the
//! `corpus` folder beside this crate's Cargo.toml).

use std::fs;
use std::path::{Path, PathBuf};

use facwatch_fuzz::{generic_site, GenericRegister, KEY};
use facwatch_proto::profile::{
    Profile, ProfileName, Ratios, ReadLimits, ReadResult, MAX_REGISTERS_PER_READ,
};
use facwatch_proto::rtu;
use facwatch_proto::seal::{seal, Purpose};
use facwatch_proto::wire::{Ack, Batch, LinkState, Quality, Sample, Status, Values};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn batches() -> Vec<Batch> {
    let ratios = Ratios { ct: 40.0, pt: 1.0 };
    let mut samples = Vec::new();
    for (i, name) in ProfileName::ALL.into_iter().enumerate() {
        let profile = Profile::builtin(name);
        let values = Values {
            power_kw: Some(12.5 + i as f32),
            energy_kwh: Some(1234.5),
            voltage_v: vec![230.1, 229.8, 231.0],
            current_a: vec![18.2, 17.9, 18.4],
            power_factor: Some(0.93),
        };
        // Through the registers and back, as a real gateway's values are.
        let words = profile.encode(&values, ratios);
        let results: Vec<ReadResult> = profile
            .reads(ReadLimits::default())
            .into_iter()
            .map(|r| ReadResult {
                function: r.function,
                address: r.address,
                words: (r.address..r.address + r.count)
                    .map(|a| {
                        words
                            .iter()
                            .find(|(f, w, _)| *f == r.function && *w == a)
                            .map_or(0, |w| w.2)
                    })
                    .collect(),
            })
            .collect();
        samples.push(Sample {
            meter: format!("m-{}", name.as_str()),
            time_ms: 1_670_911_380_000 + 30_000 * i as i64,
            quality: Quality::Ok,
            values: profile
                .decode(&results, ratios)
                .expect("seed values decode"),
        });
    }
    for (i, quality) in [
        Quality::Timeout,
        Quality::Exception(2),
        Quality::DecodeError,
        Quality::Offline,
    ]
    .into_iter()
    .enumerate()
    {
        samples.push(Sample {
            meter: format!("m-{i}"),
            time_ms: -1 - i as i64,
            quality,
            values: Values::default(),
        });
    }
    vec![
        Batch {
            gateway: "gw-01".into(),
            seq: 300,
            dropped_before: 0,
            samples: samples.clone(),
        },
        Batch {
            gateway: "gw-02".into(),
            seq: u64::MAX,
            dropped_before: 17,
            samples: samples[..2].to_vec(),
        },
        Batch {
            gateway: "g".into(),
            seq: 0,
            dropped_before: 0,
            samples: vec![],
        },
    ]
}

/// Site files anywhere in the repository (skipping build output).
fn site_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !(name.starts_with('.') || name.starts_with("target") || name == "fuzz") {
                site_files(&path, out);
            }
        } else if name.ends_with(".toml") && name.contains(".site.") {
            out.push(path);
        }
    }
}

fn generic_seeds() -> Vec<String> {
    let register = |quantity, address, value_type, unit| GenericRegister {
        quantity,
        phase: None,
        address,
        function: 3,
        value_type,
        word_order: 0,
        scale: 1.0,
        offset: 0.0,
        unit,
    };
    vec![
        generic_site(&[register(0, 0x0100, 4, 1)], 1.0, 1.0),
        // Registers at the top of the address space.
        generic_site(
            &[register(0, 0xFFFE, 4, 1), register(1, 0xFFFC, 5, 3)],
            1.0,
            1.0,
        ),
        generic_site(
            &[
                register(0, 0xFFFF, 0, 2),
                GenericRegister {
                    phase: Some(2),
                    word_order: 1,
                    ..register(2, 0xFFF0, 2, 6)
                },
                GenericRegister {
                    phase: Some(3),
                    word_order: 3,
                    scale: 0.001,
                    offset: -1.5,
                    ..register(3, 10, 3, 8)
                },
                register(4, 0x7FFF, 1, 0),
            ],
            40.0,
            100.0,
        ),
    ]
}

fn main() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = std::env::args()
        .nth(1)
        .map_or_else(|| fuzz_dir.join("corpus"), PathBuf::from);

    let dir = corpus.join("batch_decode");
    for (i, batch) in batches().iter().enumerate() {
        let bytes = batch.encode();
        write(&dir, &format!("batch-{i}"), &bytes);
        write(
            &dir,
            &format!("batch-{i}-sealed"),
            &seal(&KEY, Purpose::Batch, &bytes),
        );
    }
    for (i, seq) in [0, 1, 300, u64::MAX].into_iter().enumerate() {
        let bytes = Ack { seq }.encode();
        write(&dir, &format!("ack-{i}"), &bytes);
        write(
            &dir,
            &format!("ack-{i}-sealed"),
            &seal(&KEY, Purpose::Ack, &bytes),
        );
    }
    for (i, state) in [LinkState::Online, LinkState::Offline]
        .into_iter()
        .enumerate()
    {
        let status = Status {
            gateway: "gw-01".into(),
            state,
        };
        write(&dir, &format!("status-{i}"), &status.encode());
    }

    let dir = corpus.join("site_file");
    let mut files = Vec::new();
    site_files(&fuzz_dir.join(".."), &mut files);
    files.sort();
    for path in &files {
        let name = path.file_name().expect("a file").to_string_lossy();
        write(&dir, &name, &fs::read(path).expect("read site file"));
    }
    for (i, text) in generic_seeds().iter().enumerate() {
        write(&dir, &format!("generic-{i}.site.toml"), text.as_bytes());
    }

    let dir = corpus.join("modbus_response");
    for (i, name) in ProfileName::ALL.into_iter().enumerate() {
        let profile = Profile::builtin(name);
        for (j, read) in profile.reads(ReadLimits::default()).into_iter().enumerate() {
            write(
                &dir,
                &format!("{}-read-{j}", name.as_str()),
                &rtu::read_request(1 + i as u8, read),
            );
        }
        // Profile i, ratios 1.0 and 1.0, complete results (a 0 flag byte),
        // default limits, then words.
        let mut structured = vec![i as u8];
        structured.extend_from_slice(&1.0f64.to_le_bytes());
        structured.extend_from_slice(&1.0f64.to_le_bytes());
        structured.extend_from_slice(&[0, 0]);
        structured.extend((0..2 * MAX_REGISTERS_PER_READ).map(|b| b as u8));
        write(&dir, &format!("{}-structured", name.as_str()), &structured);
    }
    println!(
        "seeded {} with {} site files",
        corpus.display(),
        files.len()
    );
}
