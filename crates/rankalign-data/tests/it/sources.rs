//! The pre-training sources on committed files: webdataset shards written by Python's
//! `webdataset` (with corrupt members), an img2dataset-style folder, and a CSV in each
//! convention, checked against `expected.json`, which `gen_sources.py` wrote by reading
//! the same files with `webdataset` and Pillow. Then the stream's determinism and
//! resume, the errors for missing files, and random bytes into every reader.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_data::source::wds::{json_caption, list_reader, list_shard};
use rankalign_data::source::{
    CsvConvention, CsvSource, CsvSourceConfig, Loaded, PairSource, PairStream, SampleRef, Sharding,
    SkipPolicy, SourceConfig, WdsSource, WdsSourceConfig,
};
use rankalign_data::{DataPosition, SourceImage};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sources")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn parse_data(toml_text: &str) -> SourceConfig {
    toml::from_str(toml_text).unwrap()
}

fn wds_config(shards: &str, extra: &str) -> WdsSourceConfig {
    match parse_data(&format!(
        "source = \"webdataset\"\nimage_size = 32\nshards = \"{shards}\"\n{extra}"
    )) {
        SourceConfig::Webdataset(w) => w,
        _ => unreachable!(),
    }
}

fn mode_name(m: rankalign_data::PixelMode) -> &'static str {
    match m {
        rankalign_data::PixelMode::L => "L",
        rankalign_data::PixelMode::La => "LA",
        rankalign_data::PixelMode::Rgb => "RGB",
        rankalign_data::PixelMode::Rgba => "RGBA",
    }
}

/// The key, sorted extensions and loaded outcome of every sample of a shard.
fn read_shard(src: &WdsSource, shard: usize) -> Vec<(String, Vec<String>, Loaded)> {
    list_shard(&src.shards()[shard], shard)
        .unwrap()
        .into_iter()
        .map(|r| {
            let (key, mut exts) = match &r {
                SampleRef::Tar { key, members, .. } => (
                    key.clone(),
                    members.iter().map(|m| m.ext.clone()).collect::<Vec<_>>(),
                ),
                other => panic!("unexpected {other:?}"),
            };
            exts.sort();
            (key, exts, src.load(&r).unwrap())
        })
        .collect()
}

#[test]
fn webdataset_shards_read_as_webdataset_groups_them() {
    let dir = fixtures().join("wds");
    let spec = format!("{}/shard-{{00000..00001}}.tar", dir.display());
    let src = WdsSource::open(&wds_config(&spec, ""), &spec).unwrap();
    assert_eq!(src.len(), 12, "from sizes.json");
    let exp = expected();
    for (s, shard) in exp["wds"]["shards"].as_array().unwrap().iter().enumerate() {
        let want = shard["samples"].as_array().unwrap();
        let got = read_shard(&src, s);
        assert_eq!(got.len(), want.len());
        for ((key, exts, loaded), w) in got.iter().zip(want) {
            assert_eq!(key, w["key"].as_str().unwrap());
            let wexts: Vec<&str> = w["exts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap())
                .collect();
            assert_eq!(exts, &wexts, "{key}");
            let Loaded::Pair(p) = loaded else {
                panic!("{key} was skipped: {loaded:?}")
            };
            assert_eq!(p.caption, w["caption"].as_str().unwrap(), "{key}");
            // The image is the first of jpg;png;jpeg;webp present.
            let ext = ["jpg", "png", "jpeg", "webp"]
                .into_iter()
                .find(|e| wexts.contains(e))
                .unwrap();
            let im = &w["images"][ext];
            assert_eq!(p.image.width as u64, im["width"].as_u64().unwrap(), "{key}");
            assert_eq!(
                p.image.height as u64,
                im["height"].as_u64().unwrap(),
                "{key}"
            );
            assert_eq!(
                mode_name(p.image.mode),
                im["mode"].as_str().unwrap(),
                "{key}"
            );
        }
    }
}

#[test]
fn json_captions_and_webp() {
    let spec = format!("{}/shard-00001.tar", fixtures().join("wds").display());
    let cfg = wds_config(&spec, "json_text_key = \"caption\"\nnum_samples = 5");
    let src = WdsSource::open(&cfg, &spec).unwrap();
    let got = read_shard(&src, 0);
    let webp = got.iter().find(|(_, e, _)| e.contains(&"webp".to_string()));
    let Some((_, _, Loaded::Pair(p))) = webp else {
        panic!("no webp sample decoded: {got:?}")
    };
    assert!(p.image.width > 0 && !p.caption.is_empty());
    assert!(got.iter().all(|(_, _, l)| matches!(l, Loaded::Pair(_))));
}

#[test]
fn corrupt_samples_are_skipped_with_their_reason() {
    let spec = format!("{}/bad-00000.tar", fixtures().join("wds-corrupt").display());
    let src = WdsSource::open(&wds_config(&spec, ""), &spec).unwrap();
    assert_eq!(src.len(), 10, "img2dataset-style stats: successes");
    let exp = expected();
    let want = exp["wds_corrupt"]["shards"][0]["samples"]
        .as_array()
        .unwrap()
        .clone();
    let got = read_shard(&src, 0);
    assert_eq!(got.len(), want.len());
    let mut skipped = 0;
    for ((key, _, loaded), w) in got.iter().zip(&want) {
        assert_eq!(key, w["key"].as_str().unwrap());
        let defect = w.get("defect").and_then(Value::as_str);
        match (loaded, defect) {
            (Loaded::Pair(_), None) => {}
            (Loaded::Skip { reason, key: k }, Some(d)) => {
                skipped += 1;
                assert!(
                    k.contains(key.as_str()) && k.contains("bad-00000.tar"),
                    "{k}"
                );
                let expect = if d.contains("truncated") {
                    "truncated JPEG"
                } else if d.contains("HTML") {
                    "unrecognised signature"
                } else if d.contains("zero-byte") {
                    "empty image file"
                } else if d.contains("no caption") {
                    "no caption member"
                } else if d.contains("UTF-8") {
                    "not UTF-8"
                } else {
                    "decompression bomb"
                };
                assert!(reason.contains(expect), "{key}: {reason} (defect: {d})");
            }
            other => panic!("{key}: {other:?} but the defect is {defect:?}"),
        }
    }
    assert_eq!(skipped, 6);
}

#[test]
fn img2dataset_output_reads_as_webdataset() {
    let spec = format!("{}/00000.tar", fixtures().join("img2dataset").display());
    let src = WdsSource::open(&wds_config(&spec, ""), &spec).unwrap();
    assert_eq!(src.len(), 5, "00000_stats.json successes");
    let got = read_shard(&src, 0);
    let exp = expected();
    let want = exp["img2dataset"]["shards"][0]["samples"]
        .as_array()
        .unwrap();
    assert_eq!(got.len(), want.len());
    for ((key, _, l), w) in got.iter().zip(want) {
        assert_eq!(key, w["key"].as_str().unwrap());
        let Loaded::Pair(p) = l else {
            panic!("{key}: {l:?}")
        };
        assert_eq!(p.caption, w["caption"].as_str().unwrap());
    }
}

fn csv_config(path: &Path, convention: CsvConvention) -> CsvSourceConfig {
    let conv = match convention {
        CsvConvention::OpenClip => "open_clip",
        CsvConvention::Cyclip => "cyclip",
    };
    match parse_data(&format!(
        "source = \"csv\"\nimage_size = 32\npath = \"{}\"\nconvention = \"{conv}\"",
        path.display()
    )) {
        SourceConfig::Csv(c) => c,
        _ => unreachable!(),
    }
}

#[test]
fn csv_in_both_conventions() {
    let exp = expected();
    for (name, conv, key) in [
        ("openclip.tsv", CsvConvention::OpenClip, "openclip_tsv"),
        ("cyclip.csv", CsvConvention::Cyclip, "cyclip_csv"),
    ] {
        // open_clip's paths are as given: relative to the crate root, where tests run.
        let path = if conv == CsvConvention::OpenClip {
            PathBuf::from("tests/fixtures/sources").join(name)
        } else {
            fixtures().join(name)
        };
        let src = CsvSource::open(&csv_config(&path, conv), &path).unwrap();
        let rows = exp[key]["rows"].as_array().unwrap();
        assert_eq!(src.len(), rows.len(), "{name}");
        for (i, w) in rows.iter().enumerate() {
            let (p, caption) = src.row(i).unwrap();
            assert_eq!(caption, w["caption"].as_str().unwrap(), "{name} row {i}");
            assert!(
                p.ends_with(w["path"].as_str().unwrap()),
                "{name}: {}",
                p.display()
            );
            let Loaded::Pair(pair) = src.load(&SampleRef::Index(i)).unwrap() else {
                panic!("{name} row {i} skipped")
            };
            assert_eq!(
                pair.image.width as u64,
                w["image"]["width"].as_u64().unwrap()
            );
            assert_eq!(
                mode_name(pair.image.mode),
                w["image"]["mode"].as_str().unwrap()
            );
        }
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rankalign-sources-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn missing_columns_files_shards_and_bad_lines_are_named() {
    let d = tmp_dir("errors");
    let csv = d.join("list.csv");
    std::fs::write(&csv, "img,text\na.png,x\n").unwrap();
    let err = CsvSource::open(&csv_config(&csv, CsvConvention::Cyclip), &csv)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("list.csv")
            && err.contains("\"image\"")
            && err.contains("[\"img\", \"text\"]"),
        "{err}"
    );

    std::fs::write(&csv, "image,caption\na.png,x\nb.png,y,z\n").unwrap();
    let err = CsvSource::open(&csv_config(&csv, CsvConvention::Cyclip), &csv)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("list.csv:3") && err.contains("expected 2 fields"),
        "{err}"
    );

    // Listed images that do not exist are found when the list opens.
    std::fs::write(d.join("here.png"), b"x").unwrap();
    std::fs::write(
        &csv,
        "image,caption\nhere.png,x\nmissing.png,y\ngone.png,z\n",
    )
    .unwrap();
    let err = CsvSource::open(&csv_config(&csv, CsvConvention::Cyclip), &csv)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("list.csv:3") && err.contains("missing.png") && err.contains("2 of the 3"),
        "{err}"
    );

    let spec = format!(
        "{}/shard-{{00000..00002}}.tar",
        fixtures().join("wds").display()
    );
    let err = WdsSource::open(&wds_config(&spec, ""), &spec)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard-00002.tar") && err.contains("does not exist"),
        "{err}"
    );

    std::fs::copy(fixtures().join("wds/shard-00000.tar"), d.join("x.tar")).unwrap();
    let spec = format!("{}/x.tar", d.display());
    let err = WdsSource::open(&wds_config(&spec, ""), &spec)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("num_samples") && err.contains("sizes.json"),
        "{err}"
    );
}

fn keys(batch: &[rankalign_data::source::Sample]) -> Vec<String> {
    batch.iter().map(|s| s.key.clone()).collect()
}

/// A shuffled webdataset stream of both good shards and the corrupt one.
fn mixed_source() -> Arc<dyn PairSource> {
    let f = fixtures();
    let spec = format!(
        "{0}/wds/shard-00000.tar::{0}/wds/shard-00001.tar::{0}/wds-corrupt/bad-00000.tar",
        f.display()
    );
    Arc::new(
        WdsSource::open(
            &wds_config(&spec, "num_samples = 28\nshuffle_buffer = 5"),
            &spec,
        )
        .unwrap(),
    )
}

fn policy() -> SkipPolicy {
    SkipPolicy {
        max_skipped: 0.5,
        min_seen: 100,
    }
}

#[test]
fn stream_is_deterministic_across_threads_and_resumes_mid_pass() {
    let run = |threads: usize, steps: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut s = PairStream::new(
                mixed_source(),
                7,
                Sharding::default(),
                policy(),
                DataPosition::default(),
            )
            .unwrap();
            (0..steps)
                .map(|_| {
                    let (b, pos) = s.next_batch(4, 32).unwrap();
                    let pixels: Vec<u8> = b.iter().flat_map(|x| x.image.data.clone()).collect();
                    (keys(&b), pixels, pos)
                })
                .collect::<Vec<_>>()
        })
    };
    let one = run(1, 12);
    let two = run(2, 12);
    assert_eq!(one, two, "thread count changes the batches");
    // 22 good samples a pass = 5 batches of 4, the rest dropped: passes 0, 1, 2 appear.
    assert!(one.iter().any(|(_, _, p)| p.pass == 2));
    assert!(one.iter().all(|(k, _, _)| k.len() == 4));
    let first_pass: Vec<String> = one[..5].iter().flat_map(|(k, _, _)| k.clone()).collect();
    let second_pass: Vec<String> = one[5..10].iter().flat_map(|(k, _, _)| k.clone()).collect();
    assert_ne!(first_pass, second_pass, "passes reshuffle");
    // Skipped samples are counted: the six of pass 0 by the first batch of pass 1.
    let p1 = one.iter().find(|(_, _, p)| p.pass == 1).unwrap();
    assert!(
        p1.2.stats.skipped >= 6 && p1.2.stats.seen >= 28,
        "{:?}",
        p1.2.stats
    );
    assert_eq!(p1.2.stats.by_reason.get("decompression bomb"), Some(&1));
    // Resuming at any position gives the same batches after it.
    for at in [1, 4, 5, 7] {
        let mut s = PairStream::new(
            mixed_source(),
            7,
            Sharding::default(),
            policy(),
            one[at - 1].2.clone(),
        )
        .unwrap();
        for want in &one[at..] {
            let (b, pos) = s.next_batch(4, 32).unwrap();
            assert_eq!(&keys(&b), &want.0, "resumed after batch {at}");
            assert_eq!(
                b.iter()
                    .flat_map(|x| x.image.data.clone())
                    .collect::<Vec<_>>(),
                want.1
            );
            assert_eq!(pos, want.2);
        }
    }
}

#[test]
fn ranks_read_disjoint_shards() {
    let src = mixed_source();
    let keys_of = |rank| -> Vec<SampleRef> {
        src.pass(3, 0, Sharding { rank, world: 3 })
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let all: Vec<SampleRef> = src
        .pass(3, 0, Sharding::default())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let parts: Vec<Vec<SampleRef>> = (0..3).map(keys_of).collect();
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), all.len());
    for r in &all {
        assert_eq!(parts.iter().filter(|p| p.contains(r)).count(), 1);
    }
}

#[test]
fn too_many_corrupt_samples_stop_with_a_clear_error() {
    let spec = format!("{}/bad-00000.tar", fixtures().join("wds-corrupt").display());
    let src: Arc<dyn PairSource> =
        Arc::new(WdsSource::open(&wds_config(&spec, ""), &spec).unwrap());
    let strict = SkipPolicy {
        max_skipped: 0.01,
        min_seen: 100,
    };
    let mut s =
        PairStream::new(src, 1, Sharding::default(), strict, DataPosition::default()).unwrap();
    let err = loop {
        match s.next_batch(4, 32) {
            Ok(_) => continue,
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains("6 of 16") && err.contains("max_skipped") && err.contains("bad-0002"),
        "{err}"
    );
}

/// Random, truncated and bit-flipped versions of `seed_bytes`.
fn mutations(seed_bytes: &[u8], n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| match i % 3 {
            0 => {
                let len = rng.random_range(0..seed_bytes.len().max(1) * 2);
                (0..len).map(|_| rng.random()).collect()
            }
            1 => seed_bytes[..rng.random_range(0..=seed_bytes.len())].to_vec(),
            _ => {
                let mut b = seed_bytes.to_vec();
                for _ in 0..rng.random_range(1..16) {
                    if b.is_empty() {
                        break;
                    }
                    let at = rng.random_range(0..b.len());
                    b[at] ^= 1 << rng.random_range(0..8);
                }
                b
            }
        })
        .collect()
}

#[test]
fn readers_survive_random_truncated_and_flipped_bytes() {
    let f = fixtures();
    // Tar listing (and loading what it lists from the same bytes on disk).
    let tar = std::fs::read(f.join("wds-corrupt/bad-00000.tar")).unwrap();
    let d = tmp_dir("fuzz");
    for (i, bytes) in mutations(&tar, 90, 1).into_iter().enumerate() {
        let refs = list_reader(std::io::Cursor::new(&bytes), 0);
        let path = d.join("m.tar");
        std::fs::write(&path, &bytes).unwrap();
        let spec = path.display().to_string();
        let src = WdsSource::open(&wds_config(&spec, "num_samples = 1"), &spec).unwrap();
        for r in &refs {
            src.load(r).unwrap_or_else(|e| panic!("mutation {i}: {e}"));
        }
    }
    // CSV lists.
    let csv = std::fs::read(f.join("cyclip.csv")).unwrap();
    let cfg = csv_config(&f.join("cyclip.csv"), CsvConvention::Cyclip);
    for bytes in mutations(&csv, 300, 2) {
        let _ = CsvSource::parse(&cfg, &f.join("cyclip.csv"), &bytes);
    }
    // JSON captions.
    let json = br#"{"caption": "a red square", "id": 3}"#;
    for bytes in mutations(json, 300, 3) {
        let _ = json_caption(&bytes, "caption");
    }
    // Images: PNG, JPEG and WebP, with and without the pixel limit.
    for (name, seed) in [
        ("images/img-000.png", 4),
        ("images/img-001.jpg", 5),
        ("images/img-004.png", 6),
    ] {
        let img = std::fs::read(f.join(name)).unwrap();
        for bytes in mutations(&img, 150, seed) {
            let _ = SourceImage::decode(&bytes, Some(1 << 20));
            let _ = SourceImage::decode(&bytes, None);
        }
    }
}

#[test]
fn a_shard_cut_mid_member_ends_with_a_counted_skip() {
    let tar = std::fs::read(fixtures().join("wds/shard-00000.tar")).unwrap();
    let full = list_reader(std::io::Cursor::new(&tar), 0);
    // Cut inside the contents of a member of the fourth sample.
    let SampleRef::Tar { members, .. } = &full[3] else {
        panic!("{:?}", full[3])
    };
    let cut = (members[0].offset + members[0].size / 2) as usize;
    let refs = list_reader(std::io::Cursor::new(&tar[..cut]), 0);
    assert!(refs.len() <= 4, "{refs:?}");
    match refs.last() {
        Some(SampleRef::Broken { reason, .. }) => {
            assert!(reason.contains("truncated"), "{reason}")
        }
        other => panic!("expected a broken tail, got {other:?}"),
    }
}

#[test]
fn metadata_members_and_counts_as_webdataset_and_open_clip_read_them() {
    let d = tmp_dir("meta");
    let mut b = tar::Builder::new(Vec::new());
    let img = std::fs::read(fixtures().join("images/img-000.png")).unwrap();
    for (name, bytes) in [
        ("__index__", b"meta".as_slice()),
        ("__meta__/x.txt", b"meta"),
        ("__a.png", img.as_slice()),
        ("__a.txt", b"a caption"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes).unwrap();
    }
    let path = d.join("m-01.tar");
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    // `__index__` and `__meta__/…` are metadata; `__a` is an ordinary key.
    let refs = list_shard(&path, 0).unwrap();
    let keys: Vec<&str> = refs
        .iter()
        .map(|r| match r {
            SampleRef::Tar { key, .. } => key.as_str(),
            _ => "?",
        })
        .collect();
    assert_eq!(keys, ["__a"]);
    // Counts in sizes.json may be strings, as open_clip's int() accepts.
    std::fs::write(d.join("sizes.json"), r#"{"m-01.tar": "1"}"#).unwrap();
    let spec = format!("{}/m-{{1..01}}.tar", d.display());
    let src = WdsSource::open(&wds_config(&spec, ""), &spec).unwrap();
    assert_eq!(src.len(), 1);
}

/// The digit scenes through `PairStream` give, step for step, the batches `BatchPlan`
/// gave before streaming sources existed (drop_last included), so the default job
/// trains on the same data in the same order.
#[test]
fn digit_batches_are_the_batch_plans() {
    use rankalign_data::source::{DigitsSource, DigitsSourceConfig};
    use rankalign_data::{BatchPlan, Split, mix_seed};
    let cfg = DigitsSourceConfig {
        image_size: 24,
        train_size: 100,
        val_size: None,
        test_size: 1,
        mnist_images: None,
        mnist_labels: None,
    };
    let src: Arc<dyn PairSource> = Arc::new(DigitsSource::open(&cfg, 17, Split::Train).unwrap());
    let seed = mix_seed(&[17, 0xBA7C4]);
    let plan = BatchPlan::new(seed, 100, 16).unwrap();
    let mut s = PairStream::new(
        src,
        seed,
        Sharding::default(),
        policy(),
        DataPosition::default(),
    )
    .unwrap();
    for step in 0..plan.steps_per_epoch() * 3 {
        let (b, _) = s.next_batch(16, 24).unwrap();
        let got: Vec<usize> = b.iter().map(|x| x.key.parse().unwrap()).collect();
        assert_eq!(got, plan.indices(step), "step {step}");
    }
}
