//! Bad data files give errors that name the file and what was expected.

use std::path::Path;

use rankalign_data::{ClipTokenizer, Digits};

fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rankalign-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn missing_file_names_the_path() {
    let err = Digits::load(
        Path::new("/nonexistent/images.gz"),
        Path::new("/nonexistent/labels.gz"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/images.gz"), "{err}");
}

#[test]
fn wrong_magic_and_counts_are_explained() {
    let images = tmp("bad-images.gz", &gz(&[0, 0, 8, 1, 0, 0, 0, 0]));
    let labels = tmp("labels.gz", &gz(&[0, 0, 8, 1, 0, 0, 0, 0]));
    let err = Digits::load(&images, &labels).unwrap_err().to_string();
    assert!(
        err.contains("bad-images.gz") && err.contains("0x00000803"),
        "{err}"
    );

    let mut header = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    header.extend(vec![0u8; 784]); // one image where the header promises two
    let images = tmp("short-images.gz", &gz(&header));
    let err = Digits::load(&images, &labels).unwrap_err().to_string();
    assert!(
        err.contains("short-images.gz") && err.contains("2 images"),
        "{err}"
    );

    let not_gzip = tmp("plain.gz", b"hello");
    let err = Digits::load(&not_gzip, &labels).unwrap_err().to_string();
    assert!(err.contains("plain.gz") && err.contains("gzip"), "{err}");
}

#[test]
fn truncated_vocabulary_names_file_and_line() {
    let path = tmp(
        "vocab.txt.gz",
        &gz(b"#version: 0.2\ni n\nt h\nbroken-line-without-space\n"),
    );
    let err = ClipTokenizer::from_file(&path, 77).unwrap_err().to_string();
    assert!(
        err.contains("vocab.txt.gz:4") && err.contains("merge"),
        "{err}"
    );
}

#[test]
fn embedded_digits_are_all_there() {
    let d = Digits::embedded().unwrap();
    assert_eq!(d.len(), 10_000);
    let mut counts = [0usize; 10];
    for i in 0..d.len() {
        counts[d.label(i) as usize] += 1;
    }
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
}
