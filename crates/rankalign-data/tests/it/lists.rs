//! Dataset list parsers against fixture lists cut from the real L2RCLIP lists (CRLF, the
//! pandas-index CSV variant, a missing final newline), bad lines that must name file and
//! line, label ranges, rank words and the HCI splits.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rankalign_data::lists::{
    self, CROWDBEAUTY_WORDS, HciSplitConfig, LabelRange, ListEntry, MorphListStyle,
};
use rankalign_data::{DataError, Split};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lists")
        .join(rel)
}

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rankalign-data-lists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn e(path: &str, label: i64, split: Option<Split>) -> ListEntry {
    ListEntry {
        path: PathBuf::from(path),
        label,
        split,
    }
}

fn labels(entries: &[ListEntry]) -> Vec<i64> {
    entries.iter().map(|e| e.label).collect()
}

#[test]
fn morph_space_style_with_crlf() {
    let path = fixture("morph/Setting_A_fold0_train.txt");
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"race gender age filename database\r\n"));
    let list = lists::parse_morph_ab_records(&path).unwrap();
    assert_eq!(list.style, MorphListStyle::Spaces);
    assert_eq!(list.records[0].index, None);
    assert_eq!(list.records[0].database, "morph");
    assert_eq!(
        lists::parse_morph_ab(&path).unwrap(),
        vec![
            e("231783_01F31.JPG", 31, None),
            e("313952_02M33.JPG", 33, None),
            e("337435_00M17.JPG", 17, None),
        ]
    );
}

#[test]
fn morph_indexed_csv_style() {
    let path = fixture("morph/Setting_A_fold1_test.txt");
    assert!(
        std::fs::read(&path)
            .unwrap()
            .starts_with(b",race,gender,age,filename,database\r\n")
    );
    let list = lists::parse_morph_ab_records(&path).unwrap();
    assert_eq!(list.style, MorphListStyle::IndexedCsv);
    let index: Vec<_> = list.records.iter().map(|r| r.index).collect();
    assert_eq!(index, [Some(131), Some(3861), Some(2150)]);
    assert_eq!(
        lists::parse_morph_ab(&path).unwrap(),
        vec![
            e("307471_06F29.JPG", 29, None),
            e("067119_3M41.JPG", 41, None),
            e("220092_02F26.JPG", 26, None),
        ]
    );
}

#[test]
fn morph_gender_code_differs_between_settings_a_and_b() {
    let sexes = |rel: &str| -> Vec<(u8, Option<char>)> {
        lists::parse_morph_ab_records(&fixture(rel))
            .unwrap()
            .records
            .iter()
            .map(|r| (r.gender, r.filename_sex()))
            .collect()
    };
    // Setting A: 1 = male. Setting B: 0 = male.
    assert_eq!(
        sexes("morph/Setting_A_fold0_train.txt"),
        [(0, Some('F')), (1, Some('M')), (1, Some('M'))]
    );
    assert_eq!(
        sexes("morph/Setting_B_fold0.txt"),
        [
            (0, Some('M')),
            (0, Some('M')),
            (0, Some('M')),
            (1, Some('F'))
        ]
    );
}

#[test]
fn morph_cd_keeps_the_basename() {
    assert_eq!(
        lists::parse_morph_cd(&fixture("morph/morph_C_00.txt")).unwrap(),
        vec![
            e("070081_2F36.JPG", 36, None),
            e("332200_02M32.JPG", 32, None),
            e("068688_0M44.JPG", 44, None),
        ]
    );
}

#[test]
fn clap2015_splits_from_database_column() {
    let path = fixture("clap2015/total_2015.csv");
    assert!(std::fs::read(&path).unwrap().ends_with(b"test\r\n"));
    assert_eq!(
        lists::parse_clap2015(&path).unwrap(),
        vec![
            e("image_4797.jpg", 21, Some(Split::Train)),
            e("image_3532.jpg", 21, Some(Split::Train)),
            e("image_3300.jpg", 31, Some(Split::Val)),
            e("image_2513.jpg", 27, Some(Split::Test)),
        ]
    );
    let records = lists::parse_clap2015_records(&path).unwrap();
    assert_eq!(records[1].stdv, 5.26745);
}

#[test]
fn adience_groups() {
    let entries = lists::parse_adience(&fixture("adience/simplified_adience_0.txt")).unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[0],
        e(
            "30601258@N03/landmark_aligned_face.1.10399646885_67c7d20df9_o.jpg",
            4,
            None
        )
    );
}

#[test]
fn hci_decade_strings_become_indices() {
    let entries = lists::parse_hci_dir(&fixture("hci")).unwrap();
    assert_eq!(labels(&entries), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    assert_eq!(
        entries[9].path,
        Path::new("./images/1970s_decade_76ff0222af845fce32b49d3c81b7ed87.jpg")
    );
}

#[test]
fn crowdbeauty_without_final_newline() {
    let path = fixture("crowdbeauty/animals_train.txt");
    assert!(std::fs::read(&path).unwrap().ends_with(b"\t4.0"));
    assert_eq!(
        lists::parse_crowdbeauty(&path).unwrap(),
        vec![
            e("3198810904.png", 3, None),
            e("37272240.png", 3, None),
            e("5865578744.png", 4, None),
        ]
    );
    assert_eq!(CROWDBEAUTY_WORDS[3 - 1], "ordinary");
    let cases = [
        (1.0, Some(1)),
        (1.49, Some(1)),
        (2.5, Some(3)),
        (3.5, Some(4)),
        (5.0, Some(5)),
        (0.99, None),
        (5.01, None),
        (f64::NAN, None),
    ];
    for (rating, want) in cases {
        assert_eq!(lists::crowdbeauty_label(rating), want, "{rating}");
    }
}

#[test]
fn ordinalclip_multi_label_lines() {
    let path = fixture("ordinalclip/ET_proto_train.txt");
    let entries = lists::parse_multi_label(&path).unwrap();
    let got: Vec<(&Path, &[i64], i64)> = entries
        .iter()
        .map(|e| (e.path.as_path(), e.labels(), e.middle_label()))
        .collect();
    assert_eq!(
        got,
        [
            (Path::new("images/0001.jpg"), &[25][..], 25),
            (Path::new("images/0002.jpg"), &[30, 31, 32][..], 31),
            (Path::new("images/0003.jpg"), &[40, 41][..], 41),
        ]
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(entries[1].label_for(Split::Val, &mut rng), 31);
    assert_eq!(entries[1].label_for(Split::Test, &mut rng), 31);
    let draws: Vec<i64> = (0..64)
        .map(|_| entries[1].label_for(Split::Train, &mut rng))
        .collect();
    for label in [30, 31, 32] {
        assert!(draws.contains(&label), "{draws:?}");
    }
    let mut again = ChaCha8Rng::seed_from_u64(0);
    let _ = entries[1].label_for(Split::Val, &mut again); // val/test draw nothing
    let replay: Vec<i64> = (0..64)
        .map(|_| entries[1].label_for(Split::Train, &mut again))
        .collect();
    assert_eq!(draws, replay);

    let split = |name: &str| lists::split_from_file_name(Path::new(name));
    assert_eq!(split("data/ET_proto_train.txt"), Some(Split::Train));
    assert_eq!(split("ET_proto_val.txt"), Some(Split::Val));
    assert_eq!(split("Morph_TEST.txt"), Some(Split::Test));
    assert_eq!(split("train_val.txt"), Some(Split::Val));
    assert_eq!(split("fold0.txt"), None);
}

/// A bad file for each parser: the error is `Format` with the right line, and its message
/// names the file and line and says what was expected.
#[test]
fn bad_lines_name_file_and_line() {
    type Parse = fn(&Path) -> Result<usize, DataError>;
    let morph_ab: Parse = |p| lists::parse_morph_ab(p).map(|v| v.len());
    let morph_cd: Parse = |p| lists::parse_morph_cd(p).map(|v| v.len());
    let clap: Parse = |p| lists::parse_clap2015(p).map(|v| v.len());
    let adience: Parse = |p| lists::parse_adience(p).map(|v| v.len());
    let hci: Parse = |p| lists::parse_hci(p).map(|v| v.len());
    let beauty: Parse = |p| lists::parse_crowdbeauty(p).map(|v| v.len());
    let multi: Parse = |p| lists::parse_multi_label(p).map(|v| v.len());
    let cases: [(&str, Parse, &[u8], usize, &str); 15] = [
        (
            "a-header.txt",
            morph_ab,
            b"race age filename\r\n0 31 x.JPG\r\n",
            1,
            "expected header `race gender age filename database`",
        ),
        (
            "a-fields.txt",
            morph_ab,
            b"race gender age filename database\r\n0 0 31 a.JPG morph\r\n0 0 31 b.JPG\r\n",
            3,
            "expected 5 fields",
        ),
        (
            "a-age.txt",
            morph_ab,
            b",race,gender,age,filename,database\r\n1,0,0,abc,a.JPG,morph\r\n",
            2,
            "integer age, found `abc`",
        ),
        (
            "a-index.txt",
            morph_ab,
            b",race,gender,age,filename,database\n-1,0,0,30,a.JPG,morph\n",
            2,
            "non-negative integer index",
        ),
        (
            "c-fields.txt",
            morph_cd,
            b"a/1.JPG 30\n\n\na/2.JPG\n",
            4,
            "expected 2 fields `<path> <age>`",
        ),
        (
            "c-age.txt",
            morph_cd,
            b"a/1.JPG 3x\n",
            1,
            "integer age, found `3x`",
        ),
        (
            "clap-header.csv",
            clap,
            b"file,age,stdv,database\r\n",
            1,
            "expected header `filename,age,stdv,database`",
        ),
        (
            "clap-db.csv",
            clap,
            b"filename,age,stdv,database\r\nimage_1.jpg,21,4.0,train\r\nimage_2.jpg,21,4.0,dev\r\n",
            3,
            "`train`, `val` or `test`, found `dev`",
        ),
        (
            "clap-age.csv",
            clap,
            b"filename,age,stdv,database\nimage_1.jpg,21.5,4.0,train\n",
            2,
            "integer age, found `21.5`",
        ),
        (
            "adience.txt",
            adience,
            b"u/a.jpg 7\nu/b.jpg 8\n",
            2,
            "age group 0–7, found 8",
        ),
        (
            "hci.txt",
            hci,
            b"./images/x.jpg 1930s\n./images/y.jpg 1980s\n",
            2,
            "`1930s`–`1970s`, found `1980s`",
        ),
        (
            "beauty-sep.txt",
            beauty,
            b"1.png\t3.0\n2.png 3.0\n",
            2,
            "expected 2 fields `<file><TAB><rating>`",
        ),
        (
            "beauty-range.txt",
            beauty,
            b"1.png\t6.0",
            1,
            "rating 1.0–5.0, found `6.0`",
        ),
        (
            "multi.txt",
            multi,
            b"a.jpg 3 4\nb.jpg 3 x\n",
            2,
            "integer label, found `x`",
        ),
        ("utf8.txt", multi, b"a.jpg 3\n\xff.jpg 4\n", 2, "UTF-8"),
    ];
    for (name, parse, bytes, want_line, needle) in cases {
        let path = tmp(name, bytes);
        let err = parse(&path).unwrap_err();
        let msg = err.to_string();
        match &err {
            DataError::Format { path: p, line, .. } => {
                assert_eq!((p, *line), (&path, Some(want_line)), "{name}: {msg}");
            }
            other => panic!("{name}: expected a format error, got {other:?}"),
        }
        assert!(
            msg.contains(&format!("{name}:{want_line}: ")) && msg.contains(needle),
            "{name}: {msg}"
        );
    }
    let multi_alone = tmp("multi-alone.txt", b"a.jpg\n");
    let msg = lists::parse_multi_label(&multi_alone)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("multi-alone.txt:1: expected `<path> <label>"),
        "{msg}"
    );
}

#[test]
fn missing_and_empty_files() {
    let missing = Path::new("/nonexistent/rankalign/Setting_A_fold0_train.txt");
    let err = lists::parse_morph_ab(missing).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("Setting_A_fold0_train.txt"),
        "{err}"
    );

    let empty = tmp("empty.txt", b"\r\n\r\n");
    let err = lists::parse_morph_ab(&empty).unwrap_err();
    assert!(
        matches!(err, DataError::Format { line: None, .. }) && err.to_string().contains("empty"),
        "{err}"
    );
    assert_eq!(lists::parse_adience(&empty).unwrap(), vec![]);
}

#[test]
fn label_ranges_map_and_drop() {
    let morph = LabelRange::MORPH;
    assert_eq!(morph.num_ranks(), 62);
    assert_eq!(LabelRange::CLAP2015.num_ranks(), 83);
    assert_eq!(
        [15, 16, 17, 77, 78].map(|age| morph.rank(age)),
        [None, Some(0), Some(1), Some(61), None]
    );
    assert_eq!(morph.label(61), 77);
    let ranked = morph.apply(vec![
        e("a", 15, None),
        e("b", 16, None),
        e("c", 80, None),
        e("d", 77, Some(Split::Test)),
    ]);
    assert_eq!(
        ranked.entries,
        vec![e("b", 16, None), e("d", 77, Some(Split::Test))]
    );
    assert_eq!(ranked.ranks, [0, 61]);
    assert_eq!(ranked.dropped, 2);
    assert!(LabelRange::new(5, 4).is_err());
    assert_eq!(LabelRange::new(4, 4).unwrap().num_ranks(), 1);
    assert_eq!(LabelRange { min: 5, max: 4 }.num_ranks(), 0);
}

#[test]
fn number_words_match_the_official_morph_vocabulary() {
    let cases = [
        (0, "zero"),
        (16, "sixteen"),
        (17, "seventeen"),
        (20, "twenty"),
        (21, "twenty one"),
        (40, "forty"),
        (77, "seventy seven"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (1234, "one thousand two hundred thirty four"),
        (-3, "minus three"),
    ];
    for (n, want) in cases {
        assert_eq!(lists::number_words(n), want);
    }
    assert!(!lists::number_words(i64::MIN).is_empty());
    let words = LabelRange::MORPH.words();
    assert_eq!(words.len(), 62);
    // `datasets/bases.py`: 16: 'sixteen', 21: 'Twenty One', 58: 'Fifty Eight', 77: 'Seventy Seven'.
    for (age, official) in [
        (16, "sixteen"),
        (21, "Twenty One"),
        (58, "Fifty Eight"),
        (77, "Seventy Seven"),
    ] {
        assert_eq!(words[age - 16], official.to_lowercase());
    }
}

fn hci_entries(per_class: [usize; 5]) -> Vec<ListEntry> {
    per_class
        .iter()
        .enumerate()
        .flat_map(|(decade, &n)| {
            (0..n).map(move |i| e(&format!("{decade}/{i}.jpg"), decade as i64, None))
        })
        .collect()
}

#[test]
fn hci_splits_fill_each_decade() {
    let entries = hci_entries([265, 270, 265, 265, 266]);
    let cfg = HciSplitConfig::standard();
    let splits = lists::hci_splits(&entries, 3, &cfg).unwrap();
    assert_eq!(splits.len(), 10);
    for s in &splits {
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (1050, 25, 250));
        for decade in 0..5 {
            let count =
                |part: &[usize]| part.iter().filter(|&&i| entries[i].label == decade).count();
            assert_eq!(
                (count(&s.train), count(&s.val), count(&s.test)),
                (210, 5, 50)
            );
        }
        let mut all: Vec<usize> = [&s.train[..], &s.val, &s.test].concat();
        assert!(s.train.is_sorted() && s.val.is_sorted() && s.test.is_sorted());
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1325, "parts overlap");
    }
    assert_ne!(splits[0].test, splits[1].test);
    assert_eq!(lists::hci_splits(&entries, 3, &cfg).unwrap(), splits);
    assert_ne!(lists::hci_splits(&entries, 4, &cfg).unwrap()[0], splits[0]);

    let short = hci_entries([265, 265, 264, 265, 265]);
    let err = lists::hci_splits(&short, 3, &cfg).unwrap_err().to_string();
    assert!(err.contains("class 2 has 264 items, needs 265"), "{err}");
}
