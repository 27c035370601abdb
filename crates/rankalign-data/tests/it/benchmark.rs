//! The evaluation-set readers: torchvision's ImageFolder order, CLIP_benchmark's
//! layouts, the CSV and COCO forms, the errors bad sets get, and survival of random
//! and truncated bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_data::Split;
use rankalign_data::benchmark::classification::{LabelCsvConfig, image_folder, label_csv};
use rankalign_data::benchmark::retrieval::{CaptionCsvConfig, CocoConfig, caption_csv, coco};
use rankalign_data::benchmark::{ClassificationData, ImageRef, RetrievalData};
use rankalign_data::source::DigitsSourceConfig;
use rankalign_data::source::tools::{EvalExportFormat, export_eval_digits};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rankalign-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn touch(p: &Path) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"x").unwrap();
}

fn names(refs: &[ImageRef], root: &Path) -> Vec<String> {
    refs.iter()
        .map(|r| match r {
            ImageRef::File(p) => p.strip_prefix(root).unwrap().display().to_string(),
            other => other.name(),
        })
        .collect()
}

#[test]
fn image_folder_lists_files_in_torchvisions_order() {
    let d = tmp("folder");
    // Classes sort by name; inside a class, folders sort by their whole path string
    // (`a` < `a b` < `a/x`, since ' ' < '/'), files by name; extensions match
    // case-insensitively; other files are left out.
    for f in [
        "b/2.png",
        "b/1.JPG",
        "b/notes.txt",
        "a/z.webp",
        "a/a/x/0.png",
        "a/a b/0.jpeg",
        "a/a/1.png",
        "a/a/0.Png",
    ] {
        touch(&d.join(f));
    }
    let set = image_folder(&d).unwrap();
    assert_eq!(
        set.classnames.as_deref(),
        Some(&["a".to_string(), "b".to_string()][..])
    );
    assert_eq!(
        names(&set.images, &d),
        [
            "a/z.webp",
            "a/a/0.Png",
            "a/a/1.png",
            "a/a b/0.jpeg",
            "a/a/x/0.png",
            "b/1.JPG",
            "b/2.png"
        ]
    );
    assert_eq!(set.labels, [0, 0, 0, 0, 0, 1, 1]);
}

#[test]
fn an_empty_class_folder_is_an_error_that_names_it() {
    let d = tmp("empty-class");
    touch(&d.join("cat/1.png"));
    touch(&d.join("dog/readme.txt"));
    std::fs::create_dir_all(d.join("eel")).unwrap();
    let err = image_folder(&d).unwrap_err().to_string();
    assert!(
        err.contains("dog, eel") && err.contains("no image file"),
        "{err}"
    );
    let err = image_folder(&d.join("cat")).unwrap_err().to_string();
    assert!(err.contains("one sub-folder per class"), "{err}");
}

fn label_cfg(path: &Path) -> LabelCsvConfig {
    LabelCsvConfig {
        path: path.to_path_buf(),
        image_column: "image".into(),
        label_column: "label".into(),
        separator: ',',
    }
}

#[test]
fn label_csvs_take_indices_or_names_and_refuse_bad_rows() {
    let d = tmp("labels");
    for f in ["i/0.png", "i/1.png", "i/2.png"] {
        touch(&d.join(f));
    }
    let names = ["cat".to_string(), "dog".to_string()];
    let list = d.join("l.csv");
    std::fs::write(&list, "image,label\ni/0.png,1\ni/1.png,cat\ni/2.png,dog\n").unwrap();
    let set = label_csv(&label_cfg(&list), Some(&names)).unwrap();
    assert_eq!(set.labels, [1, 0, 1]);
    for (body, want) in [
        (
            "image,label\ni/0.png,0\ni/1.png,2\n",
            "l.csv:3: label 2 is outside the 2 classes",
        ),
        (
            "image,label\ni/0.png,0\ni/0.png,1\n",
            "l.csv:3: image \"i/0.png\" is listed twice (first on line 2)",
        ),
        (
            "image,label\ni/0.png,bird\n",
            "l.csv:2: label \"bird\" is not one of the 2 class names",
        ),
        ("image,label\ni/9.png,0\n", "does not exist"),
        ("img,label\ni/0.png,0\n", "no column \"image\""),
        ("image,label\n", "the list has no rows"),
    ] {
        std::fs::write(&list, body).unwrap();
        let err = label_csv(&label_cfg(&list), Some(&names))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{body:?}: {err}");
    }
}

fn caption_cfg(path: &Path) -> CaptionCsvConfig {
    CaptionCsvConfig {
        path: path.to_path_buf(),
        image_column: "image".into(),
        caption_column: "caption".into(),
        separator: ',',
    }
}

#[test]
fn caption_lists_group_by_image_and_refuse_empty_captions() {
    let d = tmp("captions");
    touch(&d.join("a.png"));
    touch(&d.join("b.png"));
    let list = d.join("c.csv");
    std::fs::write(
        &list,
        "image,caption\na.png,one\nb.png,two\na.png,\"three, quoted\"\n",
    )
    .unwrap();
    let set = caption_csv(&caption_cfg(&list)).unwrap();
    assert_eq!(set.captions, [vec!["one", "three, quoted"], vec!["two"]]);
    let (texts, owner) = set.flat_captions();
    assert_eq!((texts.len(), owner), (3, vec![0, 0, 1]));
    std::fs::write(&list, "image,caption\na.png,one\nb.png,  \n").unwrap();
    let err = caption_csv(&caption_cfg(&list)).unwrap_err().to_string();
    assert!(err.contains("c.csv:3: the caption is empty"), "{err}");
}

#[test]
fn coco_reads_both_shapes_and_refuses_orphans() {
    let d = tmp("coco");
    touch(&d.join("x/1.png"));
    touch(&d.join("x/2.png"));
    let json = d.join("c.json");
    let cfg = CocoConfig {
        path: json.clone(),
        images: None,
    };
    std::fs::write(
        &json,
        r#"{"images": [{"id": 7, "file_name": "x/2.png"}, {"id": 3, "file_name": "x/1.png"}],
            "annotations": [{"image_id": 3, "caption": "b"}, {"image_id": 7, "caption": "a"},
                            {"image_id": 3, "caption": "c"}]}"#,
    )
    .unwrap();
    let set = coco(&cfg).unwrap();
    assert_eq!(set.captions, [vec!["a"], vec!["b", "c"]]);
    assert_eq!(names(&set.images, &d), ["x/2.png", "x/1.png"]);
    std::fs::write(
        &json,
        r#"[{"image": "x/1.png", "caption": ["p", "q"]}, {"image": "x/2.png", "caption": "r"}]"#,
    )
    .unwrap();
    assert_eq!(coco(&cfg).unwrap().captions, [vec!["p", "q"], vec!["r"]]);
    for (body, want) in [
        (
            r#"{"images": [{"id": 1, "file_name": "x/1.png"}], "annotations": []}"#,
            "has no caption",
        ),
        (
            r#"{"images": [{"id": 1, "file_name": "x/1.png"}], "annotations": [{"image_id": 2, "caption": "z"}]}"#,
            "names image id 2",
        ),
        (
            r#"[{"image": "x/1.png", "caption": []}]"#,
            "empty caption list",
        ),
        (r#"{"nope": 1}"#, "expected COCO captions"),
    ] {
        std::fs::write(&json, body).unwrap();
        let err = coco(&cfg).unwrap_err().to_string();
        assert!(err.contains(want), "{body}: {err}");
    }
}

/// Write `n` items of `scenes` in `format` under `dir`, `shard` per shard.
fn export(
    scenes: &rankalign_data::DigitScenes,
    n: usize,
    format: EvalExportFormat,
    dir: &Path,
    shard: usize,
) -> PathBuf {
    export_eval_digits(scenes, n, format, dir, "test", shard).unwrap()
}

/// Load every image (errors are fine: the point is not to panic).
fn load_all(images: &[ImageRef]) {
    for i in images {
        let _ = i.load(1 << 20);
    }
}

fn digits() -> (rankalign_data::DigitScenes, DigitsSourceConfig) {
    let cfg = DigitsSourceConfig {
        image_size: 32,
        train_size: 8,
        val_size: None,
        test_size: 24,
        mnist_images: None,
        mnist_labels: None,
    };
    let d = Arc::new(cfg.digits().unwrap());
    (cfg.split(d, 3, Split::Test).unwrap(), cfg)
}

#[test]
fn the_exported_layouts_read_back_alike() {
    let (scenes, _) = digits();
    let d = tmp("layouts");
    let folder = export(&scenes, 30, EvalExportFormat::ImageFolder, &d.join("f"), 7);
    let wds = export(
        &scenes,
        30,
        EvalExportFormat::ClipBenchmark,
        &d.join("w"),
        7,
    );
    let a = ClassificationData::parse_spec(&format!("imagefolder:{}", folder.display()), "test")
        .unwrap()
        .open(None)
        .unwrap();
    let b = ClassificationData::parse_spec(&format!("wds:{}", wds.display()), "test")
        .unwrap()
        .open(None)
        .unwrap();
    assert_eq!(a.len(), 30);
    // The folder lists by class, the shards in item order: compare as multisets.
    let mut la = a.labels.clone();
    la.sort_unstable();
    let mut lb = b.labels.clone();
    lb.sort_unstable();
    assert_eq!(la, lb);
    assert_eq!(b.classnames, a.classnames);
    assert_eq!(b.templates.as_ref().unwrap().0.len(), 2);
    assert_eq!(
        std::fs::read_to_string(wds.join("test/nshards.txt")).unwrap(),
        "5\n"
    );
    let img = b.images[3].load(1 << 20).unwrap();
    assert_eq!((img.width, img.height), (32, 32));

    let csv = export(&scenes, 12, EvalExportFormat::CaptionsCsv, &d.join("c"), 5);
    let ret = export(
        &scenes,
        12,
        EvalExportFormat::ClipBenchmarkRetrieval,
        &d.join("r"),
        5,
    );
    let x = RetrievalData::parse_spec(&format!("csv:{}", csv.display()), "test")
        .unwrap()
        .open()
        .unwrap();
    let y = RetrievalData::parse_spec(&format!("wds:{}", ret.display()), "test")
        .unwrap()
        .open()
        .unwrap();
    assert_eq!(x.captions, y.captions);
    assert!(x.captions.iter().all(|c| c.len() == 4));
    assert_eq!(
        x.images[5].load(1 << 20).unwrap().to_rgb().data,
        y.images[5].load(1 << 20).unwrap().to_rgb().data
    );
}

#[test]
fn clip_benchmark_sets_refuse_missing_captions_and_labels_outside_the_classes() {
    let (scenes, _) = digits();
    let d = tmp("cb-bad");
    let ret = export(
        &scenes,
        4,
        EvalExportFormat::ClipBenchmarkRetrieval,
        &d.join("r"),
        4,
    );
    // Rewrite the shard with an empty caption file for one sample.
    let shard = ret.join("test/0.tar");
    let bytes = std::fs::read(&shard).unwrap();
    let mut out = tar::Builder::new(Vec::new());
    let mut a = tar::Archive::new(bytes.as_slice());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if name == "s00000002.txt" {
            data = b"\n  \n".to_vec();
        }
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.append_data(&mut h, &name, data.as_slice()).unwrap();
    }
    std::fs::write(&shard, out.into_inner().unwrap()).unwrap();
    let err = RetrievalData::parse_spec(&format!("wds:{}", ret.display()), "test")
        .unwrap()
        .open()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("s00000002.txt holds no caption") && err.contains("0.tar"),
        "{err}"
    );

    let cls = export(
        &scenes,
        12,
        EvalExportFormat::ClipBenchmark,
        &d.join("c"),
        12,
    );
    std::fs::write(cls.join("classnames.txt"), "zero\none\n").unwrap();
    let err = ClassificationData::parse_spec(&format!("wds:{}", cls.display()), "test")
        .unwrap()
        .open(None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the 2 classes"), "{err}");
    std::fs::remove_file(cls.join("test/nshards.txt")).unwrap();
    std::fs::write(cls.join("test/nshards.txt"), "3\n").unwrap();
    let err = ClassificationData::parse_spec(&format!("wds:{}", cls.display()), "test")
        .unwrap()
        .open(None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1.tar") && err.contains("nshards.txt lists"),
        "{err}"
    );
}

/// A reader of one mutated file: what it read, or the error it gave.
type Reader = Box<dyn Fn() -> Result<usize, rankalign_data::DataError>>;

/// Random, truncated and bit-flipped versions of `seed`.
fn mutations(seed: &[u8], n: usize, s: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    (0..n)
        .map(|i| match i % 3 {
            0 => (0..rng.random_range(0..seed.len() * 2))
                .map(|_| rng.random())
                .collect(),
            1 => seed[..rng.random_range(0..=seed.len())].to_vec(),
            _ => {
                let mut b = seed.to_vec();
                for _ in 0..rng.random_range(1..16) {
                    let at = rng.random_range(0..b.len());
                    b[at] ^= 1 << rng.random_range(0..8);
                }
                b
            }
        })
        .collect()
}

#[test]
fn evaluation_readers_survive_random_truncated_and_flipped_bytes() {
    let (scenes, _) = digits();
    let d = tmp("fuzz");
    let csv = export(&scenes, 6, EvalExportFormat::CaptionsCsv, &d.join("c"), 6);
    let ret = export(
        &scenes,
        6,
        EvalExportFormat::ClipBenchmarkRetrieval,
        &d.join("r"),
        6,
    );
    let cls = export(&scenes, 6, EvalExportFormat::ClipBenchmark, &d.join("w"), 6);
    let cases: Vec<(PathBuf, Reader)> = vec![
        (csv.clone(), {
            let c = caption_cfg(&csv);
            Box::new(move || caption_csv(&c).map(|s| s.len()))
        }),
        (ret.join("test/0.tar"), {
            let r = ret.clone();
            Box::new(move || {
                let set = RetrievalData::parse_spec(&format!("wds:{}", r.display()), "test")
                    .unwrap()
                    .open()?;
                load_all(&set.images);
                Ok(set.len())
            })
        }),
        (cls.join("test/0.tar"), {
            let r = cls.clone();
            Box::new(move || {
                let set = ClassificationData::parse_spec(&format!("wds:{}", r.display()), "test")
                    .unwrap()
                    .open(None)?;
                load_all(&set.images);
                Ok(set.len())
            })
        }),
        (cls.join("classnames.txt"), {
            let r = cls.clone();
            Box::new(move || {
                ClassificationData::parse_spec(&format!("wds:{}", r.display()), "test")
                    .unwrap()
                    .open(None)
                    .map(|s| s.len())
            })
        }),
    ];
    for (k, (file, read)) in cases.iter().enumerate() {
        let original = std::fs::read(file).unwrap();
        assert!(read().is_ok(), "{} reads before mutation", file.display());
        for bytes in mutations(&original, 120, 10 + k as u64) {
            std::fs::write(file, &bytes).unwrap();
            let _ = read();
        }
        std::fs::write(file, &original).unwrap();
    }
    // COCO JSON and label CSVs from bytes.
    let json = d.join("c.json");
    let cfg = CocoConfig {
        path: json.clone(),
        images: Some(csv.parent().unwrap().to_path_buf()),
    };
    let seed = br#"{"images": [{"id": 1, "file_name": "images/000000.png"}], "annotations": [{"image_id": 1, "caption": "a 3"}]}"#;
    for bytes in mutations(seed, 200, 30) {
        std::fs::write(&json, &bytes).unwrap();
        let _ = coco(&cfg);
    }
    let list = d.join("l.csv");
    let seed = b"image,label\nc/images/000000.png,1\nc/images/000001.png,0\n";
    for bytes in mutations(seed, 200, 31) {
        std::fs::write(&list, &bytes).unwrap();
        let _ = label_csv(&label_cfg(&list), None);
    }
}
